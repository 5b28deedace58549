"""`python -m lazyfs` is the same program as the `lazyfs` console script."""

import sys

from lazyfs.cli import main

sys.exit(main())
