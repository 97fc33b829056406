"""facegate: a self-hosted gateway in front of ailabapi's Face Analyzer Advanced API."""

__version__ = "0.1.0"
