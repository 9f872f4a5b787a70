"""``python -m server.simulation``: the launcher at the path earlier releases documented.

The launcher lives in :mod:`server.launch.simulation`; this keeps the old command
working for scripts that call it.
"""

import sys

from server.launch.simulation import main

if __name__ == "__main__":
    sys.exit(main())
