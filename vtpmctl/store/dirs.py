"""Store directories: explicit modes whatever the umask, and only ones no other user controls.

A directory another user owns, or may write, lets that user swap what
vtpmctl puts in it: root's sockets in a planted ``run/NAME``, and with them
root's TPM commands. Such a directory is refused with the command that fixes
it; one that vtpmctl creates gets its mode set exactly (``chmod`` after
``mkdir``: the umask only ever takes bits away, and 000 adds none back).
"""

from __future__ import annotations

import os
import stat

from vtpmctl.errors import StoreError
from vtpmctl.fspath import parent

TYPE_CHECKING = False
if TYPE_CHECKING:
    from vtpmctl.fspath import StrPath

# The roots' modes when vtpmctl creates them (systemd's *DirectoryMode= match).
CONFIG_MODE = 0o700  # keys and the CA
STATE_MODE = 0o755
RUNTIME_MODE = 0o755
LOGS_MODE = 0o755
PRIVATE_MODE = 0o700  # an instance's own dirs


class UnsafeDirError(StoreError):
    """A store directory belongs to another user or others may write it."""


def _trusted(uid: int) -> bool:
    """This user, or root (who can do anything to this user's files anyway)."""
    return uid in (os.geteuid(), 0)


def dir_problem(path: StrPath) -> tuple[str, str] | None:
    """(what is wrong, the fix) for an existing directory, or None if it is safe or absent."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory", f"move it away: mv {path} {path}.old"
    if not _trusted(st.st_uid):
        return (
            f"{path} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()})",
            f"remove it, or take it: chown {os.geteuid()} {path}",
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        return f"{path} is writable by group or others (mode {mode:04o})", f"chmod go-w {path}"
    return None


def check_dir(path: StrPath) -> None:
    """UnsafeDirError naming the fix unless ``path`` is absent or safe to use."""
    problem = dir_problem(path)
    if problem is not None:
        what, fix = problem
        raise UnsafeDirError(f"refusing {what}: another user could swap its files; fix: {fix}")


def ensure_dir(path: StrPath, mode: int, parent_mode: int = 0o755, check: bool = True) -> None:
    """Create ``path`` (and missing parents, ``parent_mode``) with exact modes, or check it.

    ``check=False`` keeps an existing dir as it is (``serve --state DIR``: a
    dir the user names is theirs to judge, as with swtpm).
    """
    try:
        os.mkdir(path, mode)
    except FileNotFoundError:
        ensure_dir(parent(path), parent_mode, parent_mode, check=False)
        ensure_dir(path, mode, parent_mode, check)
        return
    except FileExistsError:
        if check:
            check_dir(path)
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
