"""scripts/bench's harness: lazyfs against boto3, a local file, a pyfuse3
pass-through, s3fs, rclone and the model loaders, on one local S3 server.
Tooling, not part of the lazyfs package (see main.py)."""
