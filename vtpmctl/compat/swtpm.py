"""``swtpm socket|chardev|cuse``: swtpm 0.7.1's command line on vtpmctl's daemon."""

from __future__ import annotations

import sys

VERSION = "0.7.1"  # the swtpm release whose options, output and exit codes these are


def main(argv: list[str] | None = None, prog: str = "swtpm") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-v", "--version"):
        from vtpmctl import __version__

        sys.stdout.write(f"TPM emulator version {VERSION}, served by vtpmctl {__version__}\n")
        return 0
    sys.stderr.write("swtpm: this version of vtpmctl does not serve TPMs as swtpm yet\n")
    return 1
