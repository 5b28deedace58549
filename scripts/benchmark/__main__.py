import sys

from benchmark.main import main

sys.exit(main())
