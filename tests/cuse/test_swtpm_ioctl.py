"""The reference client, swtpm_ioctl, against /dev/vtpm-NAME served by vtpmctl.

One device for the module; the tests run in order and build on each other
(init, then blobs of growing size, then stop and shutdown).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cuselib import Served, needs_cuse, opened, served_cuse, transact_fd

from vtpmctl.commands import state
from vtpmctl.device.protocol import STATE_BLOB_CHUNK, BlobType
from vtpmctl.engine import tpm2

pytestmark = needs_cuse

NV_BASE = 0x01500100
NV_OVERHEAD = 39  # bytes a defined NV index adds to the permanent blob beyond its size
NV_MAX = 2048  # libtpms' largest NV index


@pytest.fixture(scope="module")
def dev(guest_tmp: Path) -> Iterator[Served]:
    with served_cuse("ioctl", guest_tmp / "state") as served:
        yield served


def test_capabilities(dev: Served) -> None:
    out = dev.swtpm_ioctl("-c").stdout
    assert out.strip() == "ptm capability is 0x16fff"


def test_init_info_established_locality(dev: Served) -> None:
    dev.swtpm_ioctl("-i")
    info = json.loads(dev.swtpm_ioctl("--info", "1").stdout)
    assert info["TPMSpecification"]["family"] == "2.0"
    assert dev.swtpm_ioctl("-e").stdout.strip() == "tpmEstablished is 0"
    dev.swtpm_ioctl("-l", "3")
    dev.swtpm_ioctl("-l", "0")
    dev.tpm2("startup", "-c")


def _permanent_size(dev: Served) -> int:
    with dev.client() as client:
        return len(client.get_state(BlobType.PERMANENT)[1])


def _grow_to(dev: Served, target: int, next_index: list[int]) -> None:
    """Define NV indexes until the permanent blob is exactly ``target`` bytes."""
    attrs = (
        tpm2.NvAttr.OWNERWRITE
        | tpm2.NvAttr.OWNERREAD
        | tpm2.NvAttr.AUTHREAD
        | tpm2.NvAttr.AUTHWRITE
    )
    size = _permanent_size(dev)
    while size < target:
        need = target - size - NV_OVERHEAD
        if need > NV_MAX:
            # Leave room for one more index of at least one byte.
            need = min(NV_MAX, target - size - 2 * NV_OVERHEAD - 1)
        assert need >= 1, (size, target)
        with opened(str(dev.device)) as fd:
            tpm2.nv_define_space(
                transact_fd(fd),
                tpm2.NvPublic(NV_BASE + next_index[0], tpm2.Alg.SHA256, attrs, b"", need),
            )
        next_index[0] += 1
        new = _permanent_size(dev)
        assert new == size + need + NV_OVERHEAD, (size, need, new)
        size = new
    assert size == target


def _indexes(dev: Served) -> list[int]:
    with opened(str(dev.device)) as fd:
        return [h for h in tpm2.get_handles(transact_fd(fd), tpm2.HR_NV_INDEX) if h >= NV_BASE]


# Below, at and above multiples of the 3072-byte chunk; exact multiples need the
# terminating empty chunk.
SIZES = [3072, 3200, 6143, 9216, 9300]


def test_save_and_load_across_chunk_boundaries(dev: Served, guest_tmp: Path) -> None:
    saved: dict[int, tuple[Path, list[int]]] = {}
    first = _permanent_size(dev)
    assert first < STATE_BLOB_CHUNK
    counter = [0]
    for size in [first, *SIZES]:
        if size != first:
            _grow_to(dev, size, counter)
        path = guest_tmp / f"perm-{size}.bin"
        dev.swtpm_ioctl("--save", "permanent", str(path))
        assert path.stat().st_size == size
        with dev.client() as client:
            assert client.get_state(BlobType.PERMANENT)[1] == path.read_bytes()
        saved[size] = (path, _indexes(dev))
    # The read() variant of swtpm_ioctl (SWTPM_IOCTL_BUFFERSIZE) gives the same bytes.
    for bufsize in ("4096", "3072", "100"):
        path = guest_tmp / f"perm-read-{bufsize}.bin"
        dev.swtpm_ioctl("--save", "permanent", str(path), env={"SWTPM_IOCTL_BUFFERSIZE": bufsize})
        assert path.read_bytes() == saved[SIZES[-1]][0].read_bytes(), bufsize
    vol = guest_tmp / "volatile.bin"
    dev.swtpm_ioctl("--save", "volatile", str(vol))
    assert vol.stat().st_size > STATE_BLOB_CHUNK
    empty = guest_tmp / "savestate.bin"
    dev.swtpm_ioctl("--save", "savestate", str(empty))  # a TPM 2 has none: an empty file
    assert empty.stat().st_size == 0

    # Load each size into the stopped TPM and check the indexes it brings back.
    for size in [9216, first, 3072, 6143, 9300, 3200]:
        path, indexes = saved[size]
        dev.swtpm_ioctl("--stop")
        dev.swtpm_ioctl("--load", "permanent", str(path))
        dev.swtpm_ioctl("-i")
        dev.tpm2("startup", "-c")
        assert _indexes(dev) == indexes, size
    # vtpmctl's own client: exact multiples end with an empty chunk there too.
    for size in (3072, 9216, first):
        path, indexes = saved[size]
        dev.swtpm_ioctl("--stop")
        assert state.import_(str(dev.device), str(path)) == 0
        dev.swtpm_ioctl("-i")
        dev.tpm2("startup", "-c")
        assert _indexes(dev) == indexes, size
    # And by write() streaming (SWTPM_IOCTL_BUFFERSIZE), in odd piece sizes.
    for size, bufsize in ((3072, "100"), (9216, "4096"), (6143, "3072")):
        path, indexes = saved[size]
        dev.swtpm_ioctl("--stop")
        dev.swtpm_ioctl("--load", "permanent", str(path), env={"SWTPM_IOCTL_BUFFERSIZE": bufsize})
        dev.swtpm_ioctl("-i")
        dev.tpm2("startup", "-c")
        assert _indexes(dev) == indexes, (size, bufsize)


def test_stop_and_shutdown(dev: Served) -> None:
    dev.swtpm_ioctl("--stop")
    assert dev.swtpm_ioctl("-e", check=False).returncode != 0  # not running
    assert dev.swtpm_ioctl("-c").stdout.strip() == "ptm capability is 0x16fff"
    dev.swtpm_ioctl("-s")
    assert dev.wait_exit() == 0
    assert not os.path.exists(str(dev.device)), "the node must go with the server"
