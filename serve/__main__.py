"""`python -m serve ARGS` = `lorafleet serve ARGS` (the container entry point)."""

import sys

from lorafleet.cli import main

if __name__ == "__main__":
    sys.argv = ["lorafleet", "serve", *sys.argv[1:]]
    main()
