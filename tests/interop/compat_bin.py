"""Launchers for vtpmctl's swtpm-compatible programs, for tests that call them by name.

Each launcher runs this interpreter on the vtpmctl under test with argv[0] kept, so the
programs print the name they were called by, as swtpm's do.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROGRAMS = {
    "swtpm_ioctl": "vtpmctl.compat.swtpm_ioctl",
    "swtpm_setup": "vtpmctl.compat.swtpm_setup",
}


def install(directory: Path) -> Path:
    """Write one launcher per program into ``directory``; returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, module in PROGRAMS.items():
        path = directory / name
        path.write_text(
            f"#!{sys.executable}\n"
            "import sys\n"
            f"sys.path.insert(0, {str(ROOT)!r})\n"
            f"from {module} import main\n"
            "sys.exit(main(sys.argv[1:], sys.argv[0]))\n"
        )
        os.chmod(path, 0o755)
    return directory
