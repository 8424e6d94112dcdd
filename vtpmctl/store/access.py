"""Who may reach an instance's endpoint: the owner group and modes of its sockets and run dir.

A hypervisor that runs as another user (libvirt's ``libvirt-qemu``) must
open the control socket, so ``--group`` gives it (and the run dir) a group,
and ``--socket-mode``/``--dir-mode`` their modes. What was asked is applied
exactly, never wider: modes are set with ``fchmod`` on the object itself
(the umask only ever takes bits away), the group with ``fchown``, and a
mode that would let anyone but the owner write the run dir is refused (the
store refuses such dirs, see ``store.dirs``).
"""

from __future__ import annotations

import grp
import os
import stat

from vtpmctl.errors import UsageError
from vtpmctl.frozen import Frozen

TYPE_CHECKING = False
if TYPE_CHECKING:
    from vtpmctl.fspath import StrPath

PRIVATE_SOCKET_MODE = 0o600  # no --group: only the owner
PRIVATE_DIR_MODE = 0o700
SHARED_SOCKET_MODE = 0o660  # --group: the owner and the group
SHARED_DIR_MODE = 0o710  # the group may pass through, not list


class AccessError(UsageError):
    """A --group, --socket-mode or --dir-mode value cannot be used."""


def parse_mode(text: str, what: str) -> int:
    """An octal mode as users write it: 660, 0660 or 0o660."""
    digits = text.strip().lower().removeprefix("0o")
    try:
        mode = int(digits, 8)
    except ValueError:
        mode = -1
    if not digits or not 0 <= mode <= 0o777:
        raise AccessError(f"{what} {text!r} is not an octal mode like 0660; give 3 or 4 digits")
    return mode


def format_mode(mode: int) -> str:
    return f"{mode:04o}"


def group_id(group: str) -> int:
    """The gid of a group name (or number); AccessError naming the fix if there is none."""
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        pass
    if group.isdigit():
        return int(group)
    raise AccessError(f"no group named {group!r} on this host; create it or give another --group")


class Access(Frozen):
    """The group and modes of one instance's sockets and run dir."""

    __slots__ = ("group", "socket_mode", "dir_mode")
    group: str | None
    socket_mode: int
    dir_mode: int

    def __init__(
        self,
        group: str | None = None,
        socket_mode: int = PRIVATE_SOCKET_MODE,
        dir_mode: int = PRIVATE_DIR_MODE,
    ) -> None:
        self._init(group=group, socket_mode=socket_mode, dir_mode=dir_mode)

    @classmethod
    def of(cls, group: str | None, socket_mode: str | None, dir_mode: str | None) -> Access:
        """From option values; a group makes 0660/0710 the defaults, no group 0600/0700."""
        group = group or None
        shared = group is not None
        sock = (
            parse_mode(socket_mode, "--socket-mode")
            if socket_mode is not None
            else (SHARED_SOCKET_MODE if shared else PRIVATE_SOCKET_MODE)
        )
        dirm = (
            parse_mode(dir_mode, "--dir-mode")
            if dir_mode is not None
            else (SHARED_DIR_MODE if shared else PRIVATE_DIR_MODE)
        )
        access = cls(group, sock, dirm)
        access.check()
        return access

    def check(self) -> None:
        """Modes that cannot work or that the store would refuse; the group must exist."""
        if self.socket_mode & 0o600 != 0o600:
            raise AccessError(
                f"--socket-mode {format_mode(self.socket_mode)} locks out the owner; "
                "keep rw for the owner (e.g. 0660)"
            )
        if self.dir_mode & 0o700 != 0o700:
            raise AccessError(
                f"--dir-mode {format_mode(self.dir_mode)} locks out the owner; "
                "keep rwx for the owner (e.g. 0710)"
            )
        if self.dir_mode & 0o022:
            raise AccessError(
                f"--dir-mode {format_mode(self.dir_mode)} lets others write the run dir "
                "and swap its sockets; drop the w bits (e.g. 0710)"
            )
        if self.group is not None:
            group_id(self.group)

    @property
    def gid(self) -> int:
        """The gid to give, or -1 (keep the creating process's group)."""
        return -1 if self.group is None else group_id(self.group)


def apply_to_dir(path: StrPath, access: Access) -> None:
    """Give a dir this user owns exactly the asked group and mode (no link followed)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        gid = access.gid
        if gid == -1:
            gid = os.getegid()
        if os.fstat(fd).st_gid != gid:
            os.fchown(fd, -1, gid)
        os.fchmod(fd, access.dir_mode)
    finally:
        os.close(fd)


def describe(path: StrPath) -> tuple[int, str]:
    """(mode, group name or gid) of an existing path, for verify's findings."""
    st = os.lstat(path)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return stat.S_IMODE(st.st_mode), group
