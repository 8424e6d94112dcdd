"""``python -m vtpmctl``: the command line, and the internal entry points of child processes.

vtpmctl starts its own processes as ``python -m vtpmctl _daemon …``,
``python -m vtpmctl _manufacture`` and ``python -m vtpmctl _inspect``: stable
names, so that moving a module never changes a process's command line (which
``status`` and ``stop`` read to recognise a daemon). Anything else is the
ordinary command line. This module imports nothing but the one entry it
runs: the daemon's start-up must not pay for typer, rich or cryptography.
"""

import sys

from vtpmctl.childproc import ENTRY_POINTS


def main(argv: list[str] | None = None) -> int:
    """Run an internal entry point, or the command line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ENTRY_POINTS:
        import importlib

        entry: int = importlib.import_module(ENTRY_POINTS[args[0]]).main(args[1:])
        return entry
    from vtpmctl.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
