"""`python -m specdesk.app` starts the console, like `specdesk serve` (extra arguments go to `serve`)."""

import sys

from specdesk.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
