"""``python -m dsv3 ...``: the command line of ``dsv3.cli`` (``python -m dsv3 --help`` lists the commands)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
