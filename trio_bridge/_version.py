"""The release, in one place: packaging reads it (``[tool.hatch.version]``), the handshake sends it."""

__version__ = "0.2.0"
