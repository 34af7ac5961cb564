"""`python -m hlkeras.cli ...`: the `hlkeras` command without the launcher's
log filter."""

import sys

from hlkeras.cli import main

if __name__ == "__main__":
    sys.exit(main())
