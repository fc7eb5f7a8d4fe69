"""``python -m ksbopt.bench``: the same as the ``ksbopt-bench`` command."""

import sys

from ksbopt.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
