"""The package version (one place: ``podiff.__version__`` reads it)."""

__version__ = "0.1.0"
