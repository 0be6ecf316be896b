"""zerowire: ZeRO-3 sharded training over the wire."""

__version__ = "0.1.0"
