"""Durable file replacement: a crash leaves the old bytes or the new, never half."""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from vtpmctl.errors import StoreError
from vtpmctl.fspath import join, name, parent

TYPE_CHECKING = False
if TYPE_CHECKING:
    from vtpmctl.fspath import StrPath

# A full file system, or a spent quota: one message for both, naming the file.
_NO_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


class NoSpaceError(StoreError, OSError):
    """The disk filled up while ``filename`` was written; nothing of it was kept.

    Still an OSError (errno ENOSPC/EDQUOT), so that code which handles a failed
    write goes on handling this one; its message names the file and the fix.
    """

    def __init__(self, code: int, path: StrPath) -> None:
        OSError.__init__(
            self, code, f"{_NO_SPACE[code]} writing {path}; free some space and retry", str(path)
        )

    def __str__(self) -> str:
        return str(self.strerror)


def no_space(exc: OSError, path: StrPath) -> OSError:
    """``exc`` as a NoSpaceError naming ``path`` when the disk is full, else as it is."""
    if exc.errno in _NO_SPACE and not isinstance(exc, NoSpaceError):
        return NoSpaceError(exc.errno, path)
    return exc


def fsync_dir(path: StrPath) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(
    path: StrPath,
    data: bytes,
    mode: int = 0o600,
    tmp_name: str | None = None,
    durable: bool = True,
    owner: tuple[int, int] | None = None,
) -> None:
    """Write to a temp file in the same dir, fsync, rename over, fsync the dir.

    ``tmp_name`` lets callers use a fixed temp name other tools expect
    (swtpm's ``TMP2-00.*``); otherwise a unique one is made. ``owner`` (uid,
    gid) is given to the file before it replaces the old one, so it never
    appears with another owner.
    """
    directory = parent(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    if tmp_name is None:
        # A fresh unguessable name created exclusively: nobody can pre-plant it.
        tmp = join(directory, f".{name(path)}.{os.urandom(6).hex()}.tmp")
        flags |= os.O_EXCL
    else:
        tmp = join(directory, tmp_name)
        flags |= os.O_TRUNC
    try:
        fd = os.open(tmp, flags, mode)
    except OSError as exc:
        raise no_space(exc, path) from None
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        os.fchmod(fd, mode)  # the umask may have dropped bits we want (and chown drops setgid)
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        if durable:
            os.fsync(fd)
    except BaseException as exc:
        os.close(fd)
        _unlink(tmp)
        if isinstance(exc, OSError):
            raise no_space(exc, path) from None
        raise
    os.close(fd)
    try:
        os.rename(tmp, path)
    except BaseException as exc:
        _unlink(tmp)
        if isinstance(exc, OSError):
            raise no_space(exc, path) from None
        raise
    if durable:
        fsync_dir(directory)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _refuse_link(path: StrPath, alternative: str = "") -> OSError:
    return OSError(
        errno.ELOOP,
        "it is a symbolic link, which vtpmctl never writes through; "
        f"name the file itself{alternative} or remove the link",
        str(path),
    )


def open_output(path: StrPath) -> int | None:
    """An fd for a FIFO or device that ``path`` names directly, else None.

    None means: write ``path`` with :func:`write_atomic` (it is a regular file
    or absent). The last component is never followed, so a link another user
    planted in a shared directory cannot turn an export into a write to
    whatever it points at; such a link is refused (replacing it could as well
    clobber a system link such as ``/dev/stdout``).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        raise _refuse_link(path, ", use - for stdout,")
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "it is a directory", str(path))
    if stat.S_ISREG(st.st_mode):
        return None
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC)
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):  # swapped for a file since the lstat: replace it instead
        os.close(fd)
        return None
    return fd


def write_fd(fd: int, data: bytes) -> None:
    """All of ``data`` into ``fd`` (a pipe or device may take it in pieces)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_output(path: StrPath, data: bytes, mode: int = 0o600) -> None:
    """A file the user named: written into if it is a FIFO or device, else replaced."""
    fd = open_output(path)
    if fd is None:
        write_atomic(path, data, mode)
        return
    try:
        write_fd(fd, data)
    except OSError as exc:
        raise no_space(exc, path) from None
    finally:
        os.close(fd)


def open_log(path: StrPath, mode: int = 0o600) -> int:
    """Open a log for appending without following a link or appending to another's file.

    A log outlives one process and may sit in a shared directory (``--log-file
    /tmp/x.log``), so it is opened ``O_NOFOLLOW`` and must be a regular file of
    this user with a single name: a hard link to e.g. ``/etc/shadow`` is refused.
    """
    try:
        fd = os.open(
            path,
            os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC,
            mode,
        )
    except OSError:
        # ELOOP, or EACCES where a sticky dir forbids opening another user's link.
        if os.path.islink(path):
            raise _refuse_link(path) from None
        raise
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        pass  # a FIFO or device named directly (e.g. /dev/null) is written into
    elif st.st_uid != os.geteuid():
        problem = f"it belongs to uid {st.st_uid}; remove it or choose another path"
    elif st.st_nlink != 1:
        problem = "it has other hard links; remove it or choose another path"
    if problem is not None:
        os.close(fd)
        raise OSError(errno.EPERM, problem, str(path))
    return fd
