"""Packers: one module per output format, each with ``pack`` / ``unpack``, a graph emitter (``build``) and
its inverse (``read``)."""

from . import gather_block, lowbit, matmulnbits, qdq  # noqa: F401  (importing registers the packers)
