"""`python -m lazyfs` is the same program as the `lazyfs` console script."""

import gc
import sys

gc.disable()  # from the first import on: see cli.main

from lazyfs.cli import main  # noqa: E402

sys.exit(main())
