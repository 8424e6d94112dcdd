"""``python -m vtpmctl.compat PROGRAM ARGS…``: one swtpm-compatible program by its name."""

import sys

from vtpmctl.compat.main import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
