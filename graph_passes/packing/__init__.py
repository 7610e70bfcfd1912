"""Packers: one module per output format, each with ``pack`` / ``unpack`` and a graph emitter."""
