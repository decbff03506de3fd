"""abflip: atomic A/B OS updates (command line, demo and simulated device)."""

__version__ = "0.1.0"
