"""A swtpm-compatible ``--tpmstate dir=`` directory.

Same file names, same blob format and the same ``.lock`` (a POSIX record
lock), so a stock swtpm can open a directory vtpmctl wrote and the reverse.
Unlike swtpm 0.7.1, every write is durable (fsync of file and directory).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time
from collections.abc import Iterable

from vtpmctl.errors import StoreError
from vtpmctl.fspath import clean, join
from vtpmctl.model import STATE_FILE_NAMES, BlobKind, TpmFamily
from vtpmctl.store.atomic import fsync_dir, write_atomic
from vtpmctl.store.dirs import ensure_dir

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

    from vtpmctl.fspath import StrPath
    from vtpmctl.store.blob import AesKey

LOCK_RETRY_INTERVAL = 0.01


class StateDirError(StoreError):
    """The state dir cannot be used as asked; the message says why and what to do."""


class StateDir:
    """One TPM's state files. Holds at most one fd on ``.lock`` (docs/libtpms.md, pitfall 16).

    It works on ``dir``, a ``str``; ``path`` and ``file`` give ``pathlib.Path``s for
    the CLI's code, and the daemon never calls them (``vtpmctl.fspath``).
    """

    def __init__(
        self,
        path: StrPath,
        tpm2: bool = True,
        key: AesKey | None = None,
        mode: int = 0o600,
        durable: bool = True,
        use_lock: bool = True,
    ) -> None:
        self.dir = clean(path)
        self.tpm2 = tpm2
        self.key = key
        self.mode = mode
        self.durable = durable
        # False: lock() is granted without .lock (swtpm's --tpmstate …,lock=false).
        self.use_lock = use_lock
        self._lock_fd: int | None = None
        self._unlocked_held = False
        # (uid, gid) each written file gets; None: the writer's (a restore keeps the manager's)
        self.owner: tuple[int, int] | None = None

    # ------------------------------------------------------------ names

    @property
    def prefix(self) -> str:
        return TpmFamily.of(self.tpm2).state_prefix

    @property
    def tmp_prefix(self) -> str:
        return TpmFamily.of(self.tpm2).temp_prefix

    @property
    def path(self) -> Path:
        from pathlib import Path

        return Path(self.dir)

    def fspath(self, name: str) -> str:
        """The state file's name as ``str``."""
        if name not in STATE_FILE_NAMES:
            raise ValueError(f"unknown state name {name!r}")
        return join(self.dir, self.prefix + name)

    def file(self, name: str) -> Path:
        from pathlib import Path

        return Path(self.fspath(name))

    # ------------------------------------------------------------ files

    def ensure(self) -> None:
        """Create the directory (0700) if needed."""
        ensure_dir(self.dir, 0o700, check=False)

    def exists(self, name: str) -> bool:
        return os.path.isfile(self.fspath(name))

    def read_raw(self, name: str) -> bytes | None:
        """The file's bytes as stored (possibly encrypted), or None."""
        try:
            with open(self.fspath(name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateDirError(f"cannot read {self.fspath(name)}: {exc.strerror}") from exc

    def load(self, name: str) -> bytes | None:
        """Plaintext libtpms state, None if absent; StateDirError if unusable."""
        raw = self.read_raw(name)
        if raw is None:
            return None
        # hashlib and hmac only when state is read: `status` only takes the lock
        from vtpmctl.store.blob import BlobError, unwrap_file

        try:
            return unwrap_file(raw, self.key)
        except BlobError as exc:
            hint = (
                "check the state key"
                if self.key is not None or raw[4:6] != b"\0\0"
                else "restore it from a snapshot or backup"
            )
            raise StateDirError(f"{self.fspath(name)} is unusable ({exc}); {hint}") from exc

    def load_blobs(self, kinds: Iterable[BlobKind]) -> dict[str, bytes]:
        """The plaintext state of each kind (the keys) that is present and not empty."""
        blobs = {kind: self.load(kind.file_name) for kind in kinds}
        return {kind: data for kind, data in blobs.items() if data}

    def store(self, name: str, plain: bytes) -> None:
        from vtpmctl.store.blob import wrap_file

        self.write_raw(name, wrap_file(plain, self.key))

    def write_raw(self, name: str, data: bytes) -> None:
        target = self.fspath(name)
        write_atomic(
            target,
            data,
            self.mode,
            tmp_name=self.tmp_prefix + name,
            durable=self.durable,
            owner=self.owner,
        )

    def delete(self, name: str) -> None:
        try:
            os.unlink(self.fspath(name))
        except FileNotFoundError:
            return
        if self.durable:
            fsync_dir(self.dir)

    def sizes(self) -> dict[str, int]:
        out = {}
        for name in STATE_FILE_NAMES:
            try:
                out[name] = os.stat(self.fspath(name)).st_size
            except FileNotFoundError:
                continue
        return out

    # ------------------------------------------------------------ lock

    @property
    def locked(self) -> bool:
        return self._lock_fd is not None or self._unlocked_held

    def lock(self, retries: int = 0) -> bool:
        """Take swtpm's ``.lock`` (fcntl write lock); True if held now."""
        if self.locked:
            return True
        if not self.use_lock:
            self._unlocked_held = True
            return True
        self.ensure()
        path = join(self.dir, ".lock")
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640
        )
        for attempt in range(retries + 1):
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    os.close(fd)
                    raise
                if attempt < retries:
                    time.sleep(LOCK_RETRY_INTERVAL)
                continue
            self._lock_fd = fd
            return True
        os.close(fd)
        return False

    def unlock(self) -> None:
        self._unlocked_held = False
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def holder_pid(self) -> int | None:
        """The pid holding ``.lock`` (another process), or None if free.

        Uses F_GETLK without opening for write, so it never disturbs the
        holder; a process must not call this on a dir it locked itself.
        """
        path = join(self.dir, ".lock")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            # struct flock: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
            req = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
            res = fcntl.fcntl(fd, fcntl.F_GETLK, req)
            l_type, _, _, _, pid = struct.unpack("hhqqi4x", res)
            return None if l_type == fcntl.F_UNLCK else int(pid)
        finally:
            os.close(fd)
