"""`python -m merge ARGS` = `lorafleet merge ARGS` (the container entry point)."""

import sys

from lorafleet.cli import main

if __name__ == "__main__":
    sys.argv = ["lorafleet", "merge", *sys.argv[1:]]
    main()
