"""The kernel's CUSE protocol on /dev/cuse: opcodes, structures, replies.

Spoken directly with the standard library: pyfuse3 has no CUSE support, and
the handful of messages a character device receives is smaller than a
binding to libfuse would be. Everything here is pure (bytes in, bytes out);
the server in ``server.py`` does the I/O.

Naming: ``--cuse NAME`` registers ``DEVNAME=vtpm-NAME``, so the node is
``/dev/vtpm-NAME``; a NAME that already starts with ``vtpm-`` is used as is.

ioctls are "restricted" (the kernel copies exactly the size encoded in the
request number), as with swtpm, so every PTM ioctl needs no retry round.
"""

from __future__ import annotations

import errno
import os
import re
import select
import struct
from enum import IntEnum

from vtpmctl.device.protocol import IOCTL_TO_CMD, Cmd, ioctl_fields, ioctl_sizes
from vtpmctl.errors import ServeError
from vtpmctl.model import CUSE_NAME_MAX

CUSE_DEVICE = "/dev/cuse"
DEVNAME_PREFIX = "vtpm-"
FUSE_KERNEL_VERSION = 7
FUSE_MIN_MINOR = 16  # ioctl and poll exist since 7.11; 7.16 fixed the ioctl iovec layout
FUSE_OUR_MINOR = 31
# The kernel splits one write() into requests of at most this size (and of at most
# its own 128 KiB page limit), so any sane TPM command arrives in one request.
MAX_WRITE = 128 * 1024
MAX_READ = 128 * 1024
READ_BUFSIZE = MAX_WRITE + 4096  # kernel minimum: header + fuse_write_in + max_write

_NAME_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._+-]{{0,{CUSE_NAME_MAX - 1}}}")


class Op(IntEnum):
    """FUSE opcodes a CUSE character device receives."""

    OPEN = 14
    READ = 15
    WRITE = 16
    RELEASE = 18
    FLUSH = 25
    INTERRUPT = 36
    IOCTL = 39
    POLL = 40
    CUSE_INIT = 4096


FUSE_NOTIFY_POLL = 1
FUSE_POLL_SCHEDULE_NOTIFY = 1
FUSE_IOCTL_UNRESTRICTED = 2
FUSE_IOCTL_RETRY = 4

# Kernel structures (host byte order, no implicit padding).
IN_HEADER = struct.Struct("=IIQQIIIHH")  # fuse_in_header
OUT_HEADER = struct.Struct("=IiQ")  # fuse_out_header
CUSE_INIT_IN = struct.Struct("=IIII")
CUSE_INIT_OUT = struct.Struct("=IIIIIIII40x")
OPEN_IN = struct.Struct("=II")
OPEN_OUT = struct.Struct("=QII")
RW_IN = struct.Struct("=QQIIQII")  # fuse_read_in and fuse_write_in share the layout
WRITE_OUT = struct.Struct("=II")
RELEASE_IN = struct.Struct("=QIIQ")
IOCTL_IN = struct.Struct("=QIIQII")
IOCTL_OUT = struct.Struct("=iIII")
POLL_IN = struct.Struct("=QQII")
POLL_OUT = struct.Struct("=II")
INTERRUPT_IN = struct.Struct("=Q")
NOTIFY_POLL_OUT = struct.Struct("=Q")

HDR = IN_HEADER.size
# Replies whose header and body are packed in one go (the hot path).
WRITE_REPLY = struct.Struct("=IiQII")
IOCTL_REPLY = struct.Struct("=IiQiIII")
POLL_REPLY = struct.Struct("=IiQII")

POLLIN_BITS = select.POLLIN | select.POLLRDNORM
POLLOUT_BITS = select.POLLOUT | select.POLLWRNORM


class CuseError(ServeError):
    """The device cannot be created; the message names the problem and the fix."""


class ReplyError(Exception):
    """Answer the current request with this errno.

    Control flow inside the server, outside the error tree: the request loop
    turns it into an errno reply to the kernel; it never reaches the user.
    """

    def __init__(self, err: int) -> None:
        super().__init__(os.strerror(err))
        self.errno = err


def device_name(name: str) -> str:
    """The DEVNAME for ``--cuse NAME``: ``vtpm-NAME``, never ``vtpm-vtpm-NAME``."""
    base = name[len(DEVNAME_PREFIX) :] if name.startswith(DEVNAME_PREFIX) else name
    if not _NAME_RE.fullmatch(base):
        raise CuseError(
            f"bad device name {name!r}: use 1-{CUSE_NAME_MAX} letters, digits, '.', '_', "
            "'+' or '-', starting with a letter or digit"
        )
    return DEVNAME_PREFIX + base


def exact_device_name(name: str) -> str:
    """The DEVNAME for ``swtpm cuse -n NAME``: NAME itself (``/dev/NAME``)."""
    if not _NAME_RE.fullmatch(name) or len(name) > len(DEVNAME_PREFIX) + CUSE_NAME_MAX:
        raise CuseError(
            f"bad device name {name!r}: use letters, digits, '.', '_', '+' or '-', "
            "starting with a letter or digit"
        )
    return name


def encode_reply(unique: int, body: bytes = b"", error: int = 0) -> bytes:
    """One reply: an error (a positive errno here) is the header alone."""
    if error:
        return OUT_HEADER.pack(OUT_HEADER.size, -error, unique)
    return OUT_HEADER.pack(OUT_HEADER.size + len(body), 0, unique) + body


def encode_init_reply(unique: int, kernel_major: int, kernel_minor: int, devname: str) -> bytes:
    """The CUSE_INIT answer that registers DEVNAME (restricted ioctls, dynamic major)."""
    if kernel_major != FUSE_KERNEL_VERSION or kernel_minor < FUSE_MIN_MINOR:
        raise CuseError(
            f"the kernel speaks FUSE {kernel_major}.{kernel_minor}; "
            f"need {FUSE_KERNEL_VERSION}.{FUSE_MIN_MINOR} or newer"
        )
    minor = min(kernel_minor, FUSE_OUR_MINOR)
    info = f"DEVNAME={devname}\0".encode()
    body = CUSE_INIT_OUT.pack(FUSE_KERNEL_VERSION, minor, 0, 0, MAX_READ, MAX_WRITE, 0, 0)
    return encode_reply(unique, body + info)


def lookup_ioctl(request: int, in_size: int, out_size: int) -> Cmd:
    """The control command of a PTM ioctl; ReplyError for anything else.

    An unknown number is ENOTTY. A PTM number whose size or direction does not
    match (a short buffer, or a 32-bit caller's layout) is EINVAL. SET_DATAFD
    has no meaning on a device and is ENOTTY, as the capabilities say.
    """
    cmd = IOCTL_TO_CMD.get(request)
    if cmd is None:
        nr_type = ioctl_fields(request)[2]
        for known in IOCTL_TO_CMD:
            if ioctl_fields(known)[2] == nr_type:
                raise ReplyError(errno.EINVAL)
        raise ReplyError(errno.ENOTTY)
    if cmd == Cmd.SET_DATAFD:
        raise ReplyError(errno.ENOTTY)
    if (in_size, out_size) != ioctl_sizes(request):
        raise ReplyError(errno.EINVAL)
    return cmd


def encode_read_header(unique: int, length: int) -> bytes:
    """The header of a read() reply whose ``length`` data bytes follow."""
    return OUT_HEADER.pack(OUT_HEADER.size + length, 0, unique)


def encode_notify_poll(kh: int) -> bytes:
    """Tell the kernel that the poll handle ``kh`` is ready."""
    body = NOTIFY_POLL_OUT.pack(kh)
    return OUT_HEADER.pack(OUT_HEADER.size + len(body), FUSE_NOTIFY_POLL, 0) + body
