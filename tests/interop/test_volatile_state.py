"""A corrupt saved volatile state: start offers the fix that keeps the permanent state.

Dropping the volatile state is a reboot to the guest; restoring a snapshot would also
throw away every NV write since the snapshot. The fix is ``start --delete-volatile``,
offered by ``start`` and by ``verify``, and run here as the shell command they print.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from instance_helpers import DataClient, Home, home_at, nv_define, nv_read, nv_write_cmd, rc

from vtpmctl.engine import tpm2 as t

VALUE = b"kept-nv!"


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    with home_at(tmp_path / "h") as h:
        yield h


def boot(home: Home) -> DataClient:
    home.run("ctl", "vm", "init")
    tpm = DataClient(home.registry().paths("vm").data_socket)
    assert rc(tpm.transact(t.build_startup(t.SU_CLEAR))) in (0, 0x100)
    return tpm


def garble(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + 64):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("encrypted", [False, True])
def test_corrupt_volatile_state_is_dropped_not_the_nv(
    home: Home, tmp_path: Path, encrypted: bool
) -> None:
    args = []
    if encrypted:
        key = tmp_path / "k"
        key.write_text(hashlib.sha256(b"k").hexdigest())
        key.chmod(0o600)
        args = ["--key-file", str(key)]
    home.run("create", "vm", "--no-ek", *args)
    home.run("start", "vm")
    with boot(home) as tpm:
        nv_define(tpm.transact)
        assert rc(tpm.transact(nv_write_cmd(VALUE))) == 0
    home.run("ctl", "vm", "store-volatile")
    home.run("stop", "vm")
    volatile = home.registry().paths("vm").state_dir / "tpm2-00.volatilestate"
    garble(volatile, 200)  # past the header: only libtpms (or the HMAC) can tell

    fix = "vtpmctl start vm --delete-volatile"
    refused = home.run("start", "vm", check=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert "volatile" in refused.stderr and refused.stderr.rstrip().endswith(fix), refused.stderr
    found = json.loads(home.run("verify", "vm", "--json", check=False).stdout)["findings"]
    [bad] = [f for f in found if f["level"] != "ok"]
    assert bad["fix"] == fix and "volatilestate" in (bad["path"] or "")

    env = dict(home.env, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    done = subprocess.run(bad["fix"], shell=True, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "deleted the volatile state of vm" in done.stderr
    assert not volatile.exists()
    with boot(home) as tpm:
        assert nv_read(tpm.transact) == VALUE
    assert home.run("verify", "vm").returncode == 0
