"""swtpm's linear file backend: all state blobs of one TPM in one file or block device.

``--tpmstate backend-uri=file://PATH`` (Proxmox keeps its vTPMs this way, on a
storage volume). A 192-byte little-endian header (docs/protocol.md#linear-file)
lists up to 15 sections; entry 0 is the permanent state, 1 the volatile state,
2 the save state. Each section holds exactly the bytes a state dir's file
would (blob header + TLVs) and is sized to the next power of two; a blob that
outgrows its section is moved to the end, and a deleted one's space is
reclaimed by moving the later sections down. A file whose magic does not match
is formatted, as swtpm does. A block device keeps its size and must be large
enough; a regular file grows and shrinks.

The class answers the same calls as ``StateDir`` (the engine's storage), so
the engine, ``--print-states`` and the stores above never tell them apart.
Locking (off by default for this backend, as in swtpm) is a POSIX record lock
on the file itself. ``HeldFile`` is a file another manager's swtpm serves
(vtpmctl.store.attached): held by that process, read only, read until stable.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import time
from pathlib import Path

from vtpmctl.model import STATE_FILE_NAMES
from vtpmctl.store.blob import AesKey
from vtpmctl.store.statedir import LOCK_RETRY_INTERVAL, StateDir, StateDirError

MAGIC = 0x737774706D6C696E
VERSION = 1
HEADER_SIZE = 192
ENTRIES = 15
_HEAD = struct.Struct("<QBBH")
_ENTRY = struct.Struct("<III")  # offset, data length, section length


def _section_size(length: int) -> int:
    size = 1
    while size < length:
        size <<= 1
    return size


class LinearFile(StateDir):
    """One TPM's state in swtpm's linear file format."""

    def __init__(
        self,
        path: Path,
        tpm2: bool = True,
        key: AesKey | None = None,
        mode: int = 0o640,
        use_lock: bool = False,
    ) -> None:
        super().__init__(path, tpm2=tpm2, key=key, mode=mode)
        self.use_lock = use_lock
        self._fd: int | None = None
        self._held = False

    # ------------------------------------------------------------ the file

    def _open(self) -> int:
        if self._fd is None:
            try:
                fd = os.open(
                    self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, self.mode
                )
            except OSError as exc:
                raise StateDirError(f"cannot open {self.path}: {exc.strerror}") from exc
            self._fd = fd
        return self._fd

    @property
    def is_block_device(self) -> bool:
        return stat.S_ISBLK(os.fstat(self._open()).st_mode)

    def _size(self, fd: int) -> int:
        return os.lseek(fd, 0, os.SEEK_END)

    def _entries(self) -> list[list[int]]:
        """The header's entries; an unformatted file reads as empty (it is formatted on write)."""
        fd = self._open()
        head = os.pread(fd, HEADER_SIZE, 0)
        if len(head) < HEADER_SIZE:
            return [[0, 0, 0] for _ in range(ENTRIES)]
        magic, version, _pad, hdrsize = _HEAD.unpack_from(head)
        if magic != MAGIC:
            return [[0, 0, 0] for _ in range(ENTRIES)]
        if version > VERSION or hdrsize != HEADER_SIZE:
            raise StateDirError(
                f"{self.path} is a linear state file of version {version}; "
                "this vtpmctl reads version 1 only"
            )
        return [
            list(_ENTRY.unpack_from(head, _HEAD.size + i * _ENTRY.size)) for i in range(ENTRIES)
        ]

    def _write_header(self, fd: int, entries: list[list[int]]) -> None:
        head = _HEAD.pack(MAGIC, VERSION, 0, HEADER_SIZE) + b"".join(
            _ENTRY.pack(*e) for e in entries
        )
        os.pwrite(fd, head.ljust(HEADER_SIZE, b"\0"), 0)

    def _fit(self, fd: int, end: int) -> None:
        """Make the file ``end`` bytes long (a block device must already be that large)."""
        if self.is_block_device:
            if self._size(fd) < end:
                raise OSError(
                    errno.ENOSPC, f"block device {self.path} is too small for the TPM state"
                )
            return
        os.ftruncate(fd, end)

    @staticmethod
    def _index(name: str) -> int:
        if name not in STATE_FILE_NAMES:
            raise ValueError(f"unknown state name {name!r}")
        return STATE_FILE_NAMES.index(name)

    def _remove(self, fd: int, entries: list[list[int]], index: int) -> None:
        """Drop a section and move the ones after it down over its space."""
        offset, _length, section = entries[index]
        if not offset:
            return
        entries[index] = [0, 0, 0]
        for entry in sorted((e for e in entries if e[0] > offset), key=lambda e: e[0]):
            data = os.pread(fd, entry[1], entry[0])
            entry[0] -= section
            os.pwrite(fd, data, entry[0])

    @staticmethod
    def _end(entries: list[list[int]]) -> int:
        return max([HEADER_SIZE] + [e[0] + e[2] for e in entries if e[0]])

    # ------------------------------------------------------------ StateDir's calls

    def file(self, name: str) -> Path:
        self._index(name)
        return self.path

    def ensure(self) -> None:
        self._open()

    def exists(self, name: str) -> bool:
        if not self.path.exists():
            return False
        return bool(self._entries()[self._index(name)][0])

    def read_raw(self, name: str) -> bytes | None:
        if self._fd is None and not self.path.exists():
            return None
        offset, length, _section = self._entries()[self._index(name)]
        if not offset:
            return None
        data = os.pread(self._open(), length, offset)
        if len(data) != length:
            raise StateDirError(f"{self.path} is truncated in its {name} section")
        return data

    def write_raw(self, name: str, data: bytes) -> None:
        fd = self._open()
        entries = self._entries()
        index = self._index(name)
        offset, _length, section = entries[index]
        if not offset or len(data) > section:
            self._remove(fd, entries, index)
            offset, section = self._end(entries), _section_size(len(data))
        entries[index] = [offset, len(data), section]
        self._fit(fd, self._end(entries))
        os.pwrite(fd, data, offset)
        self._write_header(fd, entries)
        os.fsync(fd)

    def delete(self, name: str) -> None:
        if self._fd is None and not self.path.exists():
            return
        fd = self._open()
        entries = self._entries()
        index = self._index(name)
        if not entries[index][0]:
            return
        self._remove(fd, entries, index)
        self._write_header(fd, entries)
        self._fit(fd, self._end(entries))
        os.fsync(fd)

    def sizes(self) -> dict[str, int]:
        if self._fd is None and not self.path.exists():
            return {}
        entries = self._entries()
        return {name: entries[i][1] for i, name in enumerate(STATE_FILE_NAMES) if entries[i][0]}

    # ------------------------------------------------------------ lock

    @property
    def locked(self) -> bool:
        return self._held

    def lock(self, retries: int = 0) -> bool:
        """The record lock on the file itself; without ``lock``, always granted."""
        if self._held:
            return True
        if not self.use_lock:
            self._held = True
            return True
        fd = self._open()
        for attempt in range(retries + 1):
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                if attempt < retries:
                    time.sleep(LOCK_RETRY_INTERVAL)
                continue
            self._held = True
            return True
        return False

    def unlock(self) -> None:
        if self._held and self.use_lock and self._fd is not None:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
        self._held = False

    def holder_pid(self) -> int | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            req = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
            l_type, _, _, _, pid = struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_GETLK, req))
            return None if l_type == fcntl.F_UNLCK else int(pid)
        finally:
            os.close(fd)

    def close(self) -> None:
        self.unlock()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def alive(pid: int) -> bool:
    """The process exists (signal 0; one of another user's counts too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class HeldFile(LinearFile):
    """The linear state file of a swtpm another manager runs (vtpmctl.store.attached).

    It is held by that process for as long as it lives: swtpm takes no lock
    on this backend unless told to (Proxmox does not), so the lock cannot say
    whether it runs; the process can. While it runs, a read of the file may meet
    a write in place, so a read is repeated until two agree.
    """

    READS = 5

    def __init__(self, path: Path, pid: int, tpm2: bool = True, key: AesKey | None = None) -> None:
        super().__init__(path, tpm2=tpm2, key=key)
        self.pid = pid

    def holder_pid(self) -> int | None:
        return self.pid if alive(self.pid) else super().holder_pid()

    def lock(self, retries: int = 0) -> bool:
        """Granted only once the process is gone (then nothing else writes the file)."""
        return not alive(self.pid) and super().lock(retries)

    def _open(self) -> int:
        if self._fd is None:
            try:  # read-only: vtpmctl never writes an attached vTPM's state
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError as exc:
                raise StateDirError(f"cannot open {self.path}: {exc.strerror}") from exc
        return self._fd

    def read_raw(self, name: str) -> bytes | None:
        last = super().read_raw(name)
        for _ in range(self.READS):
            again = super().read_raw(name)
            if again == last:
                return again
            last = again
        raise StateDirError(f"the {name} state in {self.path} kept changing while it was read")
