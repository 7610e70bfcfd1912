"""Packers: one module per output format, each with ``pack`` / ``unpack`` and a graph emitter."""

from . import gather_block, matmulnbits, qdq  # noqa: F401  (importing registers the packers)
