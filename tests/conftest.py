"""Shared by every tier: the import path (tests/support is a package), and a
faulthandler/timeout configuration in pyproject.toml.  Tier fixtures live in
tests/engine/conftest.py and tests/e2e/conftest.py."""
