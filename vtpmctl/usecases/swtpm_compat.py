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


LIBVIRT_QEMU_CONF = Path("/etc/libvirt/qemu.conf")
LIBVIRT_DEFAULT_SWTPM_USER = "tss"  # Debian's and Fedora's libvirt builds


def libvirt_swtpm_user(conf: Path = LIBVIRT_QEMU_CONF) -> str | None:
    """The user libvirt runs swtpm as (qemu.conf's ``swtpm_user``); None without libvirt."""
    import re

    try:
        text = conf.read_text(errors="replace")
    except OSError:
        return None
    user = LIBVIRT_DEFAULT_SWTPM_USER
    for line in text.splitlines():
        if match := re.match(r'\s*swtpm_user\s*=\s*"([^"]*)"', line):
            user = match.group(1)
    return user


def cannot_run(launcher: Path, user: str) -> str | None:
    """Why ``user`` cannot run ``launcher`` (None if it can, or if that cannot be tried).

    libvirt runs swtpm as an unprivileged user, who must reach the launcher's
    interpreter and vtpmctl's files: a venv under /root is out of its reach.
    The launcher's ``--version`` is run as that user, which is the proof.
    """
    import pwd
    import subprocess

    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return None
    if os.geteuid() != 0 or entry.pw_uid == 0:
        return None
    try:
        result = subprocess.run(
            [str(launcher), "--version"],
            user=entry.pw_uid,
            group=entry.pw_gid,
            extra_groups=os.getgrouplist(entry.pw_name, entry.pw_gid),
            env={"PATH": "/usr/bin:/bin", "HOME": "/"},
            cwd="/",
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
            check=False,
        )
    except PermissionError:
        return "its interpreter is not reachable"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if result.returncode == 0:
        return None
    lines = result.stderr.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else f"exit status {result.returncode}"


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
