"""`vtpmctl snapshot` against real daemons: running and stopped, restore, diff, keys, space.

The first test drives everything as a user would (a process per command, tpm2-tools);
the others run the command line in this process (``Cli``), which keeps the suite
quick without changing what is tested: the same argument parsing, output and exit codes.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_inproc import Cli, in_process_cli
from instance_helpers import DataClient, Home, home_at, nv_define, nv_read, nv_write_cmd, rc

from vtpmctl.engine import tpm2 as t
from vtpmctl.store.blob import unwrap_file
from vtpmctl.store.instance_keys import load_state_key
from vtpmctl.store.snapshots import SnapshotStore, snapshots_dir
from vtpmctl.usecases import snapshot_ops


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    with home_at(tmp_path / "h") as h:
        yield h


@pytest.fixture
def cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[Cli]:
    with in_process_cli(tmp_path, monkeypatch, capsys) as c:
        yield c


def key_file(tmp_path: Path, seed: bytes) -> Path:
    path = tmp_path / f"{seed.decode()}.key"
    path.write_text(hashlib.sha256(seed).hexdigest() + "\n")
    path.chmod(0o600)
    return path


def boot(home: Home | Cli, name: str) -> DataClient:
    """CMD_INIT and TPM2_Startup(CLEAR), as firmware does; returns a data connection."""
    home.run("ctl", name, "init")
    registry = home.registry() if isinstance(home, Home) else home.home.registry()
    tpm = DataClient(registry.paths(name).data_socket)
    assert rc(tpm.transact(t.build_startup(t.SU_CLEAR))) in (0, 0x100)
    return tpm


def write(tpm: DataClient, value: bytes) -> None:
    assert rc(tpm.transact(nv_write_cmd(value))) == 0


def snap(cli: Cli, name: str, *args: str) -> dict[str, Any]:
    return cli.json("snapshot", "create", name, *args)


def test_restore_brings_nv_back_on_a_running_instance(home: Home) -> None:
    home.run("create", "vm", "--no-ek")
    home.run("start", "vm")
    with boot(home, "vm") as tpm:
        nv_define(tpm.transact)
        write(tpm, b"AAAAAAAA")
        made = home.json("snapshot", "create", "vm", "--label", "good")
        assert made["source"] == "control channel"  # taken without stopping the TPM
        write(tpm, b"BBBBBBBB")
        write(tpm, b"CCCCCCCC")
        assert nv_read(tpm.transact) == b"CCCCCCCC"
    pid_before = home.status("vm")[1]["pid"]

    refused = home.run("snapshot", "restore", "vm", "good", check=False)
    assert refused.returncode == 1 and "--force" in refused.stderr
    out = home.json("snapshot", "restore", "vm", "good", "--force")
    assert out["restored"]["label"] == "good"
    assert out["stopped"] is True and out["restarted"] is True
    safety = out["safety_snapshot"]
    assert safety is not None and safety["label"].startswith("pre-restore-")
    code, st = home.status("vm")
    assert code == 0 and st["pid"] != pid_before
    with boot(home, "vm") as tpm:
        assert nv_read(tpm.transact) == b"AAAAAAAA"
    # ... and tpm2-tools agree
    assert home.tpm2("vm", "nvread", "0x1500016", "-C", "o", "-s", "8").stdout == b"AAAAAAAA"

    # the safety snapshot undoes the restore
    home.run("stop", "vm")
    home.run("snapshot", "restore", "vm", safety["label"])
    home.run("start", "vm")
    with boot(home, "vm") as tpm:
        assert nv_read(tpm.transact) == b"CCCCCCCC"


def test_volatile_snapshot_resumes_the_boot(cli: Cli) -> None:
    cli.run("create", "vm", "--no-ek")
    cli.run("start", "vm")
    with boot(cli, "vm") as tpm:
        nv_define(tpm.transact)
        write(tpm, b"11111111")
        made = snap(cli, "vm", "--volatile", "--label", "v")
        assert made["source"] == "control channel"
        assert made["snapshot"]["blobs"]["volatile"] is not None  # type: ignore[index]
        write(tpm, b"22222222")
    cli.run("snapshot", "restore", "vm", "v", "--force")
    paths = cli.home.registry().paths("vm")
    cli.run("ctl", "vm", "init")
    with DataClient(paths.data_socket) as tpm:
        # the volatile state resumed the TPM: it is started already
        assert rc(tpm.transact(t.build_startup(t.SU_CLEAR))) == 0x100
        assert nv_read(tpm.transact) == b"11111111"


def test_stopped_instance_and_state_dir_after_restore(cli: Cli) -> None:
    cli.run("create", "vm", "--no-ek")
    made = snap(cli, "vm")
    assert made["source"] == "state dir"
    cli.run("start", "vm")
    with boot(cli, "vm") as tpm:
        nv_define(tpm.transact)
        write(tpm, b"xxxxxxxx")
    cli.run("stop", "vm")
    sd = cli.home.registry().paths("vm").state_dir
    (sd / "tpm2-00.volatilestate").write_bytes((sd / "tpm2-00.permall").read_bytes())
    cli.run("snapshot", "restore", "vm", "1")
    assert sorted(os.listdir(sd)) == [".lock", "tpm2-00.permall"]  # no stale volatile
    assert oct(os.stat(sd / "tpm2-00.permall").st_mode & 0o777) == "0o600"
    cli.run("start", "vm")
    with boot(cli, "vm") as tpm:
        got = tpm.transact(t.build_nv_read(0x01500016, 8, auth_handle=t.RH_OWNER))
        assert t.rc_base(rc(got)) == t.RC.HANDLE  # the index did not exist yet
    assert cli.run("verify", "vm")[0] == 0


def test_volatile_snapshot_of_a_stopped_instance_is_refused(cli: Cli) -> None:
    """A stopped TPM has no boot to save: --volatile says so instead of saving less."""
    cli.run("create", "vm", "--no-ek")
    code, out, err = cli.run("snapshot", "create", "vm", "--volatile", check=False)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "no saved volatile state" in err and "without --volatile" in err
    assert cli.json("snapshot", "list", "vm")["snapshots"] == []
    # a volatile state stored before the stop is what a stopped instance can give
    cli.run("start", "vm")
    boot(cli, "vm").close()
    cli.run("ctl", "vm", "store-volatile")
    cli.run("stop", "vm")
    made = snap(cli, "vm", "--volatile")
    assert made["source"] == "state dir" and made["snapshot"]["blobs"]["volatile"] is not None


def test_busy_control_channel_reads_the_state_file(cli: Cli) -> None:
    cli.run("create", "vm", "--no-ek")
    cli.run("start", "vm")
    with boot(cli, "vm") as tpm:
        nv_define(tpm.transact)
        write(tpm, b"qqqqqqqq")
    paths = cli.home.registry().paths("vm")
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    holder.connect(str(paths.ctrl_socket))  # as QEMU does, for the life of the VM
    try:
        # The admin endpoint answers for the permanent state while the channel is held.
        start = time.monotonic()
        made = snap(cli, "vm")
        assert made["source"] == "control channel" and made["note"] is None
        assert time.monotonic() - start < 3
        # A daemon without one (an earlier version): the state file, which it keeps current.
        paths.admin_socket.unlink()
        start = time.monotonic()
        made = snap(cli, "vm")
        assert made["source"] == "state file" and "QEMU" in str(made["note"])
        assert time.monotonic() - start < snapshot_ops.BUSY_TIMEOUT + 5
        code, _, err = cli.run("snapshot", "create", "vm", "--volatile", check=False)
        assert code == 1 and "without --volatile" in err
    finally:
        holder.close()
    store = snapshot_ops.open_store(cli.home.registry().get("vm"))
    for number in ("1", "2"):
        blobs = store.read_blobs(store.find(number))
        assert blobs["permanent"] == unwrap_file(
            (paths.state_dir / "tpm2-00.permall").read_bytes(), None
        )


def test_migration_key_blob_is_unwrapped(cli: Cli, tmp_path: Path) -> None:
    cli.run(
        "create",
        "vm",
        "--no-ek",
        "--key-file",
        str(key_file(tmp_path, b"state")),
        "--migration-key-file",
        str(key_file(tmp_path, b"mig")),
    )
    cli.run("start", "vm")
    boot(cli, "vm").close()
    made = snap(cli, "vm", "--volatile")
    assert made["source"] == "control channel"
    inst = cli.home.registry().get("vm")
    store = snapshot_ops.open_store(inst)
    blobs = store.read_blobs(store.find("1"))
    assert set(blobs) == {"permanent", "volatile"}
    on_disk = unwrap_file(
        (inst.paths.state_dir / "tpm2-00.permall").read_bytes(), load_state_key(inst)
    )
    assert blobs["permanent"] == on_disk  # what the daemon keeps on disk, decrypted
    assert cli.json("snapshot", "diff", "vm", "1", "1")["error"] is None


def test_key_rotation_re_encrypts_snapshots(cli: Cli, tmp_path: Path) -> None:
    cli.run("create", "vm", "--no-ek", "--key-file", str(key_file(tmp_path, b"one")))
    snap(cli, "vm", "--label", "a")
    root = snapshots_dir(cli.home.registry().paths("vm"))
    before = {p.name: p.read_bytes() for p in (root / "objects").iterdir()}
    cli.run("key", "rotate", "vm", "--new-key-file", str(key_file(tmp_path, b"two")))
    after = {p.name: p.read_bytes() for p in (root / "objects").iterdir()}
    assert before.keys() == after.keys()
    assert all(before[n] != after[n] for n in before)
    assert not any(n.endswith(".rekey") for n in after)
    assert cli.run("verify", "vm")[0] == 0
    cli.run("snapshot", "restore", "vm", "a")
    assert cli.run("verify", "vm")[0] == 0
    snap(cli, "vm")  # new snapshots use the new key too
    cli.run("start", "vm")


def test_diff_lists_persistent_and_nv_changes(cli: Cli) -> None:
    cli.run("create", "vm", "--no-ek")
    cli.run("start", "vm")
    with boot(cli, "vm") as tpm:
        nv_define(tpm.transact)
        write(tpm, b"before!!")
        snap(cli, "vm", "--label", "a")
        write(tpm, b"after!!!")
        nv_define(tpm.transact, index=0x01500020, size=4)
        srk = t.Public(
            type=t.Alg.ECC,
            name_alg=t.Alg.SHA256,
            attributes=t.ObjAttr.FIXED_TPM
            | t.ObjAttr.FIXED_PARENT
            | t.ObjAttr.SENSITIVE_DATA_ORIGIN
            | t.ObjAttr.USER_WITH_AUTH
            | t.ObjAttr.RESTRICTED
            | t.ObjAttr.DECRYPT,
            symmetric=t.SymDef(t.Alg.AES, 128, t.Alg.CFB),
            curve=t.Curve.NIST_P256,
        )
        made = t.create_primary(tpm.transact, t.RH_OWNER, srk)
        t.evict_control(tpm.transact, made.handle, 0x81000005)
        snap(cli, "vm", "--label", "b")
    out = cli.json("snapshot", "diff", "vm", "a", "b")
    assert out["format_version"] == 1 and out["error"] is None
    assert out["blobs"] == {"permanent": "changed"}
    assert out["persistent"] == {"added": ["0x81000005"], "removed": [], "changed": []}
    assert out["nv"]["added"] == ["0x01500020"] and out["nv"]["removed"] == []
    assert out["nv"]["changed"] == [{"handle": "0x01500016", "fields": ["sha256"]}]
    text = cli.run("snapshot", "diff", "vm", "a", "b")[1]
    assert "0x81000005 added" in text and "0x01500016 changed (sha256)" in text
    back = cli.json("snapshot", "diff", "vm", "b", "a")
    assert back["persistent"]["removed"] == ["0x81000005"]


def test_damaged_snapshot_is_never_restored(cli: Cli) -> None:
    cli.run("create", "vm", "--no-ek")
    snap(cli, "vm", "--label", "x")
    paths = cli.home.registry().paths("vm")
    (obj,) = (snapshots_dir(paths) / "objects").iterdir()
    raw = bytearray(obj.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    obj.write_bytes(bytes(raw))
    state_before = (paths.state_dir / "tpm2-00.permall").read_bytes()
    code, _, err = cli.run("snapshot", "restore", "vm", "x", check=False)
    assert code == 1 and "Traceback" not in err and "is corrupt" in err
    assert (paths.state_dir / "tpm2-00.permall").read_bytes() == state_before
    assert len(cli.json("snapshot", "list", "vm")["snapshots"]) == 1  # no safety snapshot
    verify = cli.json("verify", "vm", check=False)
    assert verify["ok"] is False
    assert any(f["check"] == "snapshots.object" for f in verify["findings"])


def test_keep_and_rm(cli: Cli) -> None:
    cli.run("create", "vm", "--no-ek")
    inst = cli.home.registry().get("vm")
    for i in range(4):
        snapshot_ops.create(inst, label=f"s{i}")
    out = snap(cli, "vm", "--keep", "2", "--label", "last")
    assert [p["label"] for p in out["pruned"]] == ["s0", "s1", "s2"]  # type: ignore[index]
    listing = cli.json("snapshot", "list", "vm")
    assert [s["label"] for s in listing["snapshots"]] == ["s3", "last"]
    assert listing["disk_usage"]["bytes"] > 0
    cli.run("snapshot", "rm", "vm", "s3")
    assert [s["id"] for s in cli.json("snapshot", "list", "vm")["snapshots"]] == [5]
    code, _, err = cli.run("snapshot", "rm", "vm", "s3", check=False)
    assert code == 1 and "no snapshot" in err


def test_hundred_snapshots_of_an_unchanged_vtpm(cli: Cli) -> None:
    """100 snapshots take less than twice the space of one.

    "Space" is measured two ways over the whole snapshots dir (objects, index,
    lock, directories): the bytes in its files (st_size), and what the file
    system allocated for files and directories (st_blocks). The vTPM is a
    default one, with EKs and their certificates (about 5 KB of state).
    """
    cli.run("create", "vm")
    inst = cli.home.registry().get("vm")
    snapshot_ops.create(inst)
    store = SnapshotStore(snapshots_dir(inst.paths), None)
    one = store.disk_usage()
    for _ in range(99):
        snapshot_ops.create(inst)
    hundred = store.disk_usage()
    assert len(store.all()) == 100
    assert hundred[0] < 2 * one[0], (one, hundred)
    assert hundred[1] < 2 * one[1], (one, hundred)
    index = json.loads(store.index_path.read_bytes())
    assert len(index["states"]) == 1 and len(store.object_names()) == 1
