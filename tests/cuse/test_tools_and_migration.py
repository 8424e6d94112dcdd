"""tpm2-tools on /dev/vtpm-NAME, the vtpmctl control client over ioctl, and a
TPM's state moving CUSE -> socket -> CUSE with `vtpmctl state export/import`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cuselib import Served, needs_cuse, serve_socket, served_cuse

from vtpmctl.commands import state

pytestmark = needs_cuse

KEY = "0x81000001"
NV_A = "0x1500016"
NV_B = "0x1500017"
# Filled in as the module runs: the persistent key's Name and the NV contents.
seen: dict[str, bytes] = {}


@pytest.fixture(scope="module")
def first(guest_tmp: Path) -> Iterator[Served]:
    with served_cuse("tools", guest_tmp / "a") as served:
        yield served


def _name(dev: Served, tmp: Path) -> bytes:
    out = tmp / "name.bin"
    dev.tpm2("readpublic", "-c", KEY, "-n", str(out))
    return out.read_bytes()


def _nvread(dev: Served, index: str, size: int, tmp: Path) -> bytes:
    out = tmp / "nv.bin"
    dev.tpm2("nvread", index, "-C", "o", "-s", str(size), "-o", str(out))
    return out.read_bytes()


def test_vtpmctl_queries_the_device(first: Served) -> None:
    caps = json.loads(first.vtpmctl("caps", first.device or "", "--json").stdout)
    assert caps["caps"] == 0x16FFF
    first.vtpmctl("ctl", first.target, "init")
    info = json.loads(first.vtpmctl("info", first.target, "--json").stdout)
    assert "2.0" in json.dumps(info)


def test_tpm2_tools(first: Served, guest_tmp: Path) -> None:
    first.tpm2("startup", "-c")
    rand = first.tpm2("getrandom", "--hex", "16").stdout.strip()
    assert len(rand) == 32 and int(rand, 16) >= 0
    ctx = guest_tmp / "primary.ctx"
    first.tpm2("createprimary", "-C", "o", "-g", "sha256", "-G", "ecc", "-c", str(ctx))
    first.tpm2("evictcontrol", "-C", "o", "-c", str(ctx), KEY)
    seen["name"] = _name(first, guest_tmp)
    assert len(seen["name"]) == 34  # sha256 nameAlg + digest
    data = guest_tmp / "nv-a.bin"
    seen["nv_a"] = os.urandom(32)
    data.write_bytes(seen["nv_a"])
    first.tpm2("nvdefine", NV_A, "-C", "o", "-s", "32", "-a", "ownerread|ownerwrite")
    first.tpm2("nvwrite", NV_A, "-C", "o", "-i", str(data))
    assert _nvread(first, NV_A, 32, guest_tmp) == seen["nv_a"]


def test_state_moves_cuse_socket_cuse(first: Served, guest_tmp: Path) -> None:
    assert "name" in seen, "needs test_tpm2_tools"
    perm_a = guest_tmp / "a.permall"
    first.vtpmctl("state", "export", first.target, "-o", str(perm_a))
    ref = guest_tmp / "a.swtpm_ioctl"
    first.swtpm_ioctl("--save", "permanent", str(ref))
    assert perm_a.read_bytes() == ref.read_bytes()
    first.vtpmctl("ctl", first.target, "shutdown")
    assert first.wait_exit() == 0
    assert not os.path.exists(first.device or ""), "node left after CMD_SHUTDOWN"

    # The socket side in process (the same functions as the command line, which
    # costs a minute per call in the guest); the device side through the CLI.
    sock = serve_socket(guest_tmp / "b", guest_tmp / "run")
    try:
        assert state.import_(sock.target, str(perm_a)) == 0
        sock.swtpm_ioctl("-i")
        sock.tpm2("startup", "-c")
        assert _name(sock, guest_tmp) == seen["name"]
        assert _nvread(sock, NV_A, 32, guest_tmp) == seen["nv_a"]
        # Something only the socket side did must arrive on the second device.
        seen["nv_b"] = os.urandom(16)
        (guest_tmp / "nv-b.bin").write_bytes(seen["nv_b"])
        sock.tpm2("nvdefine", NV_B, "-C", "o", "-s", "16", "-a", "ownerread|ownerwrite")
        sock.tpm2("nvwrite", NV_B, "-C", "o", "-i", str(guest_tmp / "nv-b.bin"))
        perm_b = guest_tmp / "b.permall"
        assert state.export(sock.target, str(perm_b)) == 0
        ref_b = guest_tmp / "b.swtpm_ioctl"
        sock.swtpm_ioctl("--save", "permanent", str(ref_b))
        assert perm_b.read_bytes() == ref_b.read_bytes()
    finally:
        assert sock.stop() == 0, sock.log_text()[-3000:]

    with served_cuse("tools2", guest_tmp / "c") as third:
        third.vtpmctl("state", "import", third.target, str(perm_b))
        third.swtpm_ioctl("-i")
        third.tpm2("startup", "-c")
        assert _name(third, guest_tmp) == seen["name"]
        assert _nvread(third, NV_A, 32, guest_tmp) == seen["nv_a"]
        assert _nvread(third, NV_B, 16, guest_tmp) == seen["nv_b"]
        # Exports from the device: vtpmctl and swtpm_ioctl write the same file.
        out = guest_tmp / "c.permall"
        assert state.export(third.target, str(out)) == 0
        ref_c = guest_tmp / "c.swtpm_ioctl"
        third.swtpm_ioctl("--save", "permanent", str(ref_c))
        assert out.read_bytes() == ref_c.read_bytes()
