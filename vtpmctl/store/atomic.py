"""Durable file replacement: a crash leaves the old bytes or the new, never half."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(
    path: Path, data: bytes, mode: int = 0o600, tmp_name: str | None = None, durable: bool = True
) -> None:
    """Write to a temp file in the same dir, fsync, rename over, fsync the dir.

    ``tmp_name`` lets callers use a fixed temp name other tools expect
    (swtpm's ``TMP2-00.*``); otherwise a unique one is made.
    """
    directory = path.parent
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    if tmp_name is None:
        # A fresh unguessable name created exclusively: nobody can pre-plant it.
        tmp = directory / f".{path.name}.{secrets.token_hex(6)}.tmp"
        flags |= os.O_EXCL
    else:
        tmp = directory / tmp_name
        flags |= os.O_TRUNC
    fd = os.open(tmp, flags, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have dropped bits we want
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(directory)
