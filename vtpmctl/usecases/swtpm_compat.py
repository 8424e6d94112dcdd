"""Put swtpm's program names where callers look, without touching the distribution's swtpm.

``install DIR`` writes one small launcher per program (``swtpm``,
``swtpm_setup``, ``swtpm_ioctl``) into DIR; each runs vtpmctl's multi-call
entry point (``vtpmctl.compat.main``), which picks the program by the name it
was started as. A launcher carries a marker line, so that ``uninstall`` and a
second ``install`` replace or remove only files vtpmctl wrote. The
distribution's own directories are refused: the swtpm package stays intact
and the choice is made by PATH order.
"""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from vtpmctl.errors import StoreError
from vtpmctl.model import SwtpmProgram
from vtpmctl.store.atomic import fsync_dir, write_atomic

MARKER = "# vtpmctl swtpm-compat launcher"
LAUNCHER_MODE = 0o755
# Where a distribution's packages put programs: never ours to write.
_SYSTEM_DIRS = tuple(Path(p) for p in ("/usr/bin", "/usr/sbin", "/bin", "/sbin"))
_MARKER_WINDOW = 512  # the marker is on the second line


class LauncherError(StoreError):
    """A launcher cannot be installed or removed; nothing else was changed."""


@dataclass(frozen=True)
class Change:
    path: Path
    action: str  # "installed" | "replaced" | "removed" | "absent"


def launcher_text(python: str) -> str:
    """The launcher: the same script for every program (argv[0] picks)."""
    return (
        f"#!{python}\n"
        f"{MARKER}: runs the program named by this file's name with vtpmctl.\n"
        "# Remove with `vtpmctl swtpm-compat uninstall DIR`.\n"
        "import sys\n"
        "from vtpmctl.compat.main import main\n"
        "sys.exit(main())\n"
    )


def is_launcher(path: Path) -> bool:
    """A regular file (not a link) that vtpmctl wrote."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        head = os.read(fd, _MARKER_WINDOW)
    finally:
        os.close(fd)
    return head.startswith(b"#!") and MARKER.encode() in head


def _check_dir(directory: Path) -> Path:
    if not directory.is_dir():
        raise LauncherError(f"{directory} is not a directory; create it first (e.g. mkdir -p)")
    real = directory.resolve()
    for system in _SYSTEM_DIRS:
        if real == system.resolve():
            raise LauncherError(
                f"{directory} holds the distribution's programs and is never written; "
                "use /usr/local/bin (or another directory earlier in PATH)"
            )
    return real


def install(directory: Path, python: str | None = None) -> list[Change]:
    """Write the three launchers into ``directory``; all of them or none.

    A file of the same name that vtpmctl did not write (e.g. a real swtpm) is
    never replaced: the whole install is refused before anything is written.
    """
    directory = Path(directory)
    _check_dir(directory)
    text = launcher_text(python or sys.executable).encode()
    plan: list[Change] = []
    for program in SwtpmProgram:
        path = directory / program.value
        if os.path.lexists(path):
            if not is_launcher(path):
                raise LauncherError(
                    f"{path} exists and is not a vtpmctl launcher; nothing was installed "
                    "(remove or move it, or choose another directory)"
                )
            plan.append(Change(path, "replaced"))
        else:
            plan.append(Change(path, "installed"))
    try:
        for change in plan:
            write_atomic(change.path, text, LAUNCHER_MODE)
    except OSError as exc:
        raise LauncherError(f"cannot write into {directory}: {exc.strerror or exc}") from None
    return plan


def uninstall(directory: Path) -> tuple[list[Change], list[Path]]:
    """Remove vtpmctl's launchers from ``directory``: (changes, files left alone)."""
    directory = Path(directory)
    _check_dir(directory)
    changes: list[Change] = []
    foreign: list[Path] = []
    for program in SwtpmProgram:
        path = directory / program.value
        if not os.path.lexists(path):
            changes.append(Change(path, "absent"))
        elif not is_launcher(path):
            foreign.append(path)
        else:
            try:
                path.unlink()
            except OSError as exc:
                raise LauncherError(f"cannot remove {path}: {exc.strerror}") from None
            changes.append(Change(path, "removed"))
    if any(c.action == "removed" for c in changes):
        fsync_dir(directory)
    return changes, foreign
