"""Tools for tests, the demo and the benchmark: a local S3 server, a counting
and fault-injecting proxy in front of it, a sample model, and a helper that
runs `lazyfs mount` as a subprocess the way a user would.  Not used by the
filesystem itself."""
