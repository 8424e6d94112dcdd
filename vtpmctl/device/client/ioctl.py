"""The control channel of a CUSE TPM device (/dev/vtpm-x): real ioctls.

``IoctlTransport`` owns the encoding and the 3072-byte chunking; this class
only opens the device and issues each ioctl with a mutable buffer of exactly
the size the request number encodes (CUSE TPMs use restricted ioctls, so
the kernel copies that many bytes each way).

A CUSE ioctl cannot time out: the kernel waits for the server's answer (a
signal only asks the server to give up). ``timeout`` is kept for the
Transport interface and unused.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from vtpmctl.device.client.control import DEFAULT_TIMEOUT, IoctlTransport, TargetError
from vtpmctl.device.protocol import IOCTL_TO_CMD


class DeviceTransport(IoctlTransport):
    """One open file descriptor of a CUSE TPM, opened on first use."""

    def __init__(
        self, path: str, *, timeout: float = DEFAULT_TIMEOUT, name: str | None = None
    ) -> None:
        self.path = path
        self.name = name or path
        self.timeout = timeout
        self._fd: int | None = None

    def open(self) -> None:
        """Open the device now rather than on the first command."""
        if self._fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise self._open_error(exc) from exc
        try:
            is_chr = stat.S_ISCHR(os.fstat(fd).st_mode)
        except OSError:
            is_chr = False
        if not is_chr:
            os.close(fd)
            raise TargetError(
                f"{self.name}: not a character device; give a CUSE TPM such as /dev/vtpm-NAME",
                self.name,
            )
        self._fd = fd

    def _open_error(self, exc: OSError) -> TargetError:
        name = self.name
        if exc.errno == errno.ENOENT:
            return TargetError(
                f"{name}: no such device; is the TPM served? "
                "(vtpmctl serve --cuse NAME creates /dev/vtpm-NAME)",
                name,
            )
        if exc.errno == errno.EBUSY:
            return TargetError(
                f"{name}: busy; another program (such as QEMU or a TPM tool) "
                "has it open, and a CUSE TPM serves one opener at a time",
                name,
            )
        if exc.errno in (errno.EACCES, errno.EPERM):
            return TargetError(
                f"{name}: permission denied; run as root or as the device's owner", name
            )
        if exc.errno in (errno.ENODEV, errno.ENXIO, errno.ECONNABORTED):
            return TargetError(
                f"{name}: the device has no server any more; start the TPM again", name
            )
        return TargetError(f"{name}: cannot open: {exc.strerror or exc}", name)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def ioctl(self, request: int, buf: bytearray) -> bytes:
        if self._fd is None:
            self.open()
        assert self._fd is not None
        try:
            fcntl.ioctl(self._fd, request, buf, True)
        except OSError as exc:
            raise self._ioctl_error(request, exc) from exc
        return bytes(buf)

    def _ioctl_error(self, request: int, exc: OSError) -> TargetError:
        name = self.name
        cmd = IOCTL_TO_CMD.get(request)
        what = f"CMD_{cmd.name}" if cmd is not None else f"ioctl {request:#x}"
        if exc.errno == errno.ENOTTY:
            return TargetError(
                f"{name}: does not understand {what}; is it a TPM device "
                "with the swtpm control interface?",
                name,
            )
        if exc.errno == errno.EINVAL:
            return TargetError(
                f"{name}: rejected {what} (EINVAL); the device speaks "
                "another layout of the control interface",
                name,
            )
        if exc.errno in (errno.ENODEV, errno.ECONNABORTED, errno.EIO, errno.ENOTCONN):
            self.close()
            return TargetError(
                f"{name}: the TPM process went away during {what}; start it again", name
            )
        return TargetError(f"{name}: {what} failed: {exc.strerror or exc}", name)
