"""lazyfs: S3 prefixes as local read-only files, fetched on first use, kept on disk."""

__version__ = "0.1.0"
