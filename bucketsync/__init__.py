"""bucketsync: shared pieces (config, CLI, local stack)."""

__version__ = "0.1.0"
