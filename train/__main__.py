"""`python -m train ARGS` = `lorafleet train ARGS` (the container entry point)."""

import sys

from lorafleet.cli import main

if __name__ == "__main__":
    sys.argv = ["lorafleet", "train", *sys.argv[1:]]
    main()
