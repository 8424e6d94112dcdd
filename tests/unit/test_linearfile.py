"""swtpm's linear file backend: layout, moves, compaction, formatting, locking."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from vtpmctl.store.blob import unwrap_file, wrap_file
from vtpmctl.store.linearfile import HEADER_SIZE, MAGIC, LinearFile
from vtpmctl.store.statedir import StateDirError


def _entries(path: Path) -> list[tuple[int, int, int]]:
    data = path.read_bytes()
    assert struct.unpack_from("<QBBH", data) == (MAGIC, 1, 0, HEADER_SIZE)
    return [struct.unpack_from("<III", data, 12 + 12 * i) for i in range(3)]


def test_layout_matches_swtpms(tmp_path: Path) -> None:
    """A 3219-byte permall sits at 192 in a 4096-byte section: a 4288-byte file."""
    path = tmp_path / "tpm.raw"
    lf = LinearFile(path)
    blob = b"p" * 3219
    lf.write_raw("permall", blob)
    assert path.read_bytes()[:8] == b"nilmptws"
    assert _entries(path) == [(192, 3219, 4096), (0, 0, 0), (0, 0, 0)]
    assert path.stat().st_size == 4288
    assert lf.read_raw("permall") == blob
    assert lf.sizes() == {"permall": 3219}


def test_growing_moves_to_the_end_and_delete_compacts(tmp_path: Path) -> None:
    path = tmp_path / "tpm.raw"
    lf = LinearFile(path)
    lf.write_raw("permall", b"a" * 1000)  # section 1024 at 192
    lf.write_raw("volatilestate", b"b" * 500)  # section 512 at 1216
    lf.write_raw("permall", b"c" * 1020)  # still fits
    assert _entries(path)[:2] == [(192, 1020, 1024), (1216, 500, 512)]
    lf.write_raw("permall", b"d" * 2000)  # outgrows: volatile moves down, permall to the end
    assert _entries(path)[:2] == [(704, 2000, 2048), (192, 500, 512)]
    assert lf.read_raw("volatilestate") == b"b" * 500
    assert path.stat().st_size == 704 + 2048
    lf.delete("volatilestate")
    assert _entries(path)[:2] == [(192, 2000, 2048), (0, 0, 0)]
    assert path.stat().st_size == 192 + 2048
    assert lf.read_raw("permall") == b"d" * 2000
    assert lf.read_raw("volatilestate") is None
    lf.close()


def test_foreign_bytes_are_formatted_and_blobs_are_state_files(tmp_path: Path) -> None:
    path = tmp_path / "tpm.raw"
    path.write_bytes(b"\xff" * 4096)
    lf = LinearFile(path)
    assert lf.sizes() == {}
    lf.store("permall", b"state")
    assert unwrap_file(lf.read_raw("permall") or b"", None) == b"state"
    assert lf.read_raw("permall") == wrap_file(b"state", None)
    assert LinearFile(path).load("permall") == b"state"


def test_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tpm.raw"
    path.write_bytes(struct.pack("<QBBH", MAGIC, 2, 0, HEADER_SIZE).ljust(HEADER_SIZE, b"\0"))
    with pytest.raises(StateDirError, match="version 2"):
        LinearFile(path).read_raw("permall")


def test_lock_is_on_the_file_only_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "tpm.raw"
    unlocked = LinearFile(path)
    assert unlocked.lock() and unlocked.locked
    assert unlocked.holder_pid() is None  # no record lock was taken
    locked = LinearFile(path, use_lock=True)
    assert locked.lock()
    locked.unlock()
    assert not locked.locked
