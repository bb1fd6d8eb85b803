"""`python -m adabatch ...` is the `adabatch` command."""

import sys

from adabatch.cli import main

if __name__ == "__main__":
    sys.exit(main())
