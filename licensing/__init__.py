"""licensing: a highly available floating-license server on Twisted."""

__version__ = "0.1.0"
