"""shoal: Network Load Balancing for Linux."""

__version__ = "0.1.0"
