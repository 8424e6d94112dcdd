"""Launchers for vtpmctl's swtpm-compatible programs, for tests that call them by name.

Each launcher runs the multi-call entry point (``vtpmctl.compat.main``) on the vtpmctl
under test with argv[0] kept, so the programs print the name they were called by, as
swtpm's do. ``for_others=True`` makes launchers that another user can run (libvirt
runs swtpm as ``tss``): the system's Python of the same version (this one may live
under /root), this tree and the venv's packages on PYTHONPATH, which the children
vtpmctl starts inherit.
"""

from __future__ import annotations

import os
import site
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROGRAMS = ("swtpm", "swtpm_ioctl", "swtpm_setup")
SYSTEM_PYTHON = Path(f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}")


def install(directory: Path, *, for_others: bool = False) -> Path:
    """Write one launcher per program into ``directory``; returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    paths = [str(ROOT)]
    if for_others:
        python = str(SYSTEM_PYTHON)
        paths += site.getsitepackages()
        os.chmod(directory, 0o755)
    for name in PROGRAMS:
        path = directory / name
        path.write_text(
            f"#!{python}\n"
            "import os, sys\n"
            f"PATHS = {paths!r}\n"
            "sys.path[:0] = PATHS\n"
            "os.environ['PYTHONPATH'] = os.pathsep.join(PATHS)\n"
            "from vtpmctl.compat.main import main\n"
            "sys.exit(main())\n"
        )
        os.chmod(path, 0o755)
    return directory
