"""Crashes inside `snapshot restore` and `key rotate`: nothing acknowledged is lost.

Each test runs the operation once to list its durable steps (every fsync, rename,
replace and unlink), then again in a fresh copy of the same store for each step,
killed with ``os._exit`` exactly there (``crash_server.py``). After each crash, as an admin
would: ``verify`` and each fix it prints (run as a shell command), ``start``, ``verify``
again and its fixes; then the TPM must hold every NV write acknowledged before the
operation (or, after a restore that went through, the snapshot's value, with the
state it replaced kept in the safety snapshot). A process that dies at an fsync
leaves the same files as one that dies at the rename or unlink after it (the kernel
keeps what was written), except for a temp file nothing reads: so the crash points
are the renames and unlinks, each one being the crash at the fsyncs before it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from instance_helpers import DataClient, nv_define, nv_read, nv_write_cmd, rc

from vtpmctl.device.client.control import ControlClient, SocketTransport
from vtpmctl.engine import tpm2 as t
from vtpmctl.store.instance_keys import load_state_key
from vtpmctl.store.instances import Registry
from vtpmctl.store.paths import store_roots
from vtpmctl.store.snapshots import SnapshotStore, restore_marker, snapshots_dir
from vtpmctl.store.statedir import StateDir

NAME = "vm"
BEFORE, AFTER = b"AAAAAAAA", b"BBBBBBBB"  # in the snapshot; acknowledged after it
LATER = b"CCCCCCCC"
BIN = str(Path(sys.executable).parent)
CRASHED = 137


class Server:
    """vtpmctl command lines in forked children of one warm process (crash_server.py)."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("crash_server.py"))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.n = 0

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)

    def run(self, home: Path, *argv: str, crash_at: int = 0) -> tuple[int, str, str, list[str]]:
        """(exit code, stdout, stderr, the steps it took) of one command line."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.n += 1
        out = str(self.scratch / f"cmd{self.n}")
        req = {"home": str(home), "argv": list(argv), "crash_at": crash_at, "out": out}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        code = json.loads(self.proc.stdout.readline())["code"]
        texts = [Path(out + s).read_text() for s in (".out", ".err")]
        trace = Path(out + ".trace")
        steps = json.loads(trace.read_text()) if trace.exists() else []
        for suffix in (".out", ".err", ".trace"):
            Path(out + suffix).unlink(missing_ok=True)
        return code, texts[0], texts[1], steps

    def ok(self, home: Path, *argv: str) -> str:
        code, out, err, _ = self.run(home, *argv)
        assert code == 0, f"vtpmctl {' '.join(argv)} exited {code}: {err}"
        return out


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    scratch = tmp_path / "out"
    scratch.mkdir()
    srv = Server(scratch)
    try:
        yield srv
    finally:
        srv.close()


def registry(home: Path) -> Registry:
    return Registry(store_roots({"VTPMCTL_HOME": str(home)}))


def kill_daemons(home: Path) -> None:
    reg = registry(home)
    for name in reg.names():
        pid = reg.get(name).statedir().holder_pid()
        if pid is not None:
            os.kill(pid, 9)


def boot(home: Path) -> DataClient:
    """CMD_INIT and TPM2_Startup(CLEAR) (or resume), as firmware does."""
    paths = registry(home).paths(NAME)
    with ControlClient(SocketTransport(str(paths.ctrl_socket))) as ctrl:
        ctrl.init()
    tpm = DataClient(paths.data_socket)
    assert rc(tpm.transact(t.build_startup(t.SU_CLEAR))) in (0, 0x100)
    return tpm


def write(tpm: DataClient, value: bytes) -> None:
    assert rc(tpm.transact(nv_write_cmd(value))) == 0


def key_file(path: Path, seed: bytes) -> Path:
    path.write_text(hashlib.sha256(seed).hexdigest() + "\n")
    path.chmod(0o600)
    return path


def live_state(home: Path) -> dict[str, bytes | None]:
    """Plaintext state files of the stopped instance."""
    inst = registry(home).get(NAME)
    sd = StateDir(inst.paths.state_dir, key=load_state_key(inst))
    return {n: sd.load(n) for n in ("permall", "volatilestate")}


@pytest.fixture
def template(tmp_path: Path, server: Server) -> Iterator[tuple[Path, dict[str, bytes | None]]]:
    """A stopped encrypted instance: snapshot s1 holds BEFORE, the live state AFTER
    (written and acknowledged after the snapshot) plus a stored volatile state."""
    home = tmp_path / "t"
    try:
        server.ok(
            home,
            "create",
            NAME,
            "--no-ek",
            "--encrypt",
            "--key-file",
            str(key_file(tmp_path / "k1", b"one")),
        )
        server.ok(home, "start", NAME)
        with boot(home) as tpm:
            nv_define(tpm.transact)
            write(tpm, BEFORE)
            server.ok(home, "snapshot", "create", NAME, "--volatile", "--label", "s1")
            write(tpm, AFTER)
        server.ok(home, "ctl", NAME, "store-volatile")
        server.ok(home, "stop", NAME)
        state = live_state(home)
        assert state["volatilestate"] is not None
        yield home, state
    finally:
        kill_daemons(home)


def shell(home: Path, command: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, VTPMCTL_HOME=str(home), PATH=f"{BIN}:{os.environ['PATH']}")
    env.pop("NOTIFY_SOCKET", None)
    return subprocess.run(
        command, shell=True, env=env, capture_output=True, text=True, timeout=60, check=False
    )


def verify_and_fix(server: Server, home: Path) -> list[dict[str, Any]]:
    """`verify --json`, then each fix it prints, as a shell command; the problems found."""
    code, out, err, _ = server.run(home, "verify", NAME, "--json")
    problems = [f for f in json.loads(out)["findings"] if f["level"] != "ok"]
    for f in problems:
        if f["fix"] is None:
            assert f["level"] == "warn", f"no fix for {f}"
            continue
        assert re.match(r"(vtpmctl|rm|chmod) ", f["fix"]), f"not a command: {f}"
        done = shell(home, f["fix"])
        assert done.returncode == 0, f"fix {f['fix']!r} failed: {done.stderr}"
    return problems


def settle_and_read(server: Server, home: Path) -> tuple[bytes, list[dict[str, Any]]]:
    """What an admin does after a crash; returns the NV value and verify's first findings
    (those are looked at only while a decided rotation or restore is pending)."""
    paths = registry(home).paths(NAME)
    pending = (paths.secrets_dir / "rotate.commit").exists() or restore_marker(
        paths.state_dir
    ).exists()
    first = verify_and_fix(server, home) if pending else []
    code, _, err, _ = server.run(home, "start", NAME)
    assert code == 0, f"start after the crash failed: {err}"
    again = verify_and_fix(server, home)
    assert all(f["level"] == "warn" and f["fix"] is None for f in again), again
    with boot(home) as tpm:
        value = nv_read(tpm.transact)
    server.ok(home, "stop", NAME)
    return value, first


def crash_loop(
    tmp_path: Path, server: Server, template: Path, argv: list[str]
) -> Iterator[tuple[int, Path, int]]:
    """Each (step, store crashed there, exit code); the last one ran to its end."""
    count_home = tmp_path / "count"
    shutil.copytree(template, count_home, symlinks=True)
    code, _, err, steps = server.run(count_home, *argv)
    assert code == 0 and "rename" in steps, err
    shutil.rmtree(count_home)
    points = [n for n, call in enumerate(steps, 1) if call != "fsync"] + [len(steps) + 1]
    for step in points:
        home = tmp_path / f"s{step}"
        shutil.copytree(template, home, symlinks=True)
        code, _, err, _ = server.run(home, *argv, crash_at=step)
        assert code == (0 if step > len(steps) else CRASHED), (step, code, err)
        try:
            yield step, home, code
        finally:
            kill_daemons(home)
            shutil.rmtree(home)


def test_crash_at_every_step_of_a_restore(
    tmp_path: Path, server: Server, template: tuple[Path, dict[str, bytes | None]]
) -> None:
    home_t, live = template
    restored = 0
    for step, home, _ in crash_loop(tmp_path, server, home_t, ["snapshot", "restore", NAME, "s1"]):
        value, _ = settle_and_read(server, home)
        assert value in (BEFORE, AFTER), f"step {step}: NV holds {value!r}"
        if value == BEFORE:  # the restore went through: what was live is in the safety snapshot
            restored += 1
            inst = registry(home).get(NAME)
            store = SnapshotStore(snapshots_dir(inst.paths), load_state_key(inst))
            safety = [s for s in store.all() if (s.label or "").startswith("pre-restore-")]
            assert len(safety) == 1, f"step {step}: safety snapshots {safety}"
            blobs = store.read_blobs(safety[0])
            assert blobs["permanent"] == live["permall"], f"step {step}"
            assert blobs.get("volatile") == live["volatilestate"], f"step {step}"
        assert not restore_marker(registry(home).paths(NAME).state_dir).exists()
    assert restored > 0


def test_crash_at_every_step_of_a_key_rotation(
    tmp_path: Path, server: Server, template: tuple[Path, dict[str, bytes | None]]
) -> None:
    home_t, _ = template
    new_key = key_file(tmp_path / "k2", b"two")
    fingerprints = set()
    argv = ["key", "rotate", NAME, "--new-key-file", str(new_key)]
    for step, home, _ in crash_loop(tmp_path, server, home_t, argv):
        decided = (registry(home).paths(NAME).secrets_dir / "rotate.commit").exists()
        if decided:  # what does not settle it names what does, not a wrong key
            code, _, err, _ = server.run(home, "snapshot", "list", NAME)
            assert code == 1 and err.rstrip().endswith(f"vtpmctl start {NAME}"), err
        value, first = settle_and_read(server, home)
        assert value == AFTER, f"step {step}: NV holds {value!r}"
        if decided:  # one finding, and its fix finishes the rotation
            assert [f["check"] for f in first] == ["key.rotation"], (step, first)
            assert "decided" in first[0]["what"] and first[0]["fix"] == f"vtpmctl start {NAME}"
        # snapshot s1 is readable under whichever key the instance has now
        inst = registry(home).get(NAME)
        store = SnapshotStore(snapshots_dir(inst.paths), load_state_key(inst))
        assert store.read_blobs(store.find("s1"))["permanent"]
        fingerprints.add(inst.meta.key_fingerprint)
    assert len(fingerprints) == 2  # some crashes rolled back, others went through


def crash_after_decision(tmp_path: Path, server: Server, template: Path) -> Path:
    """A copy of the store whose restore of s1 was killed right after its marker."""
    argv = ["snapshot", "restore", NAME, "s1"]
    home = tmp_path / "decided"
    shutil.copytree(template, home, symlinks=True)
    count_home = tmp_path / "count"
    shutil.copytree(template, count_home, symlinks=True)
    _, _, err, steps = server.run(count_home, *argv)
    shutil.rmtree(count_home)
    first_unlink = steps.index("unlink") + 1  # rolling forward starts with the old volatile
    code, _, err, _ = server.run(home, *argv, crash_at=first_unlink)
    assert code == CRASHED, err
    assert restore_marker(registry(home).paths(NAME).state_dir).exists()
    return home


def nv_value(server: Server, home: Path) -> bytes:
    server.ok(home, "start", NAME)
    with boot(home) as tpm:
        value = nv_read(tpm.transact)
    server.ok(home, "stop", NAME)
    return value


def test_work_after_an_interrupted_restore_is_kept(
    tmp_path: Path, server: Server, template: tuple[Path, dict[str, bytes | None]]
) -> None:
    """The crash of item 2: start finishes the restore (saying so), work done after it
    is kept by the next restore's safety snapshot."""
    home = crash_after_decision(tmp_path, server, template[0])
    code, out, err, _ = server.run(home, "start", NAME)
    assert code == 0 and "finished the interrupted restore of snapshot" in err, err
    with boot(home) as tpm:
        assert nv_read(tpm.transact) == BEFORE  # the restore went through
        write(tpm, LATER)
    server.ok(home, "stop", NAME)
    out = json.loads(server.ok(home, "snapshot", "restore", NAME, "s1", "--json"))
    safety = out["safety_snapshot"]["label"]
    assert nv_value(server, home) == BEFORE
    server.ok(home, "snapshot", "restore", NAME, safety)
    assert nv_value(server, home) == LATER


def test_a_stale_restore_marker_is_never_rolled_over_newer_work(
    tmp_path: Path, server: Server, template: tuple[Path, dict[str, bytes | None]]
) -> None:
    """A marker left by an older vtpmctl, whose instance then ran on: the newer state wins,
    whichever command takes the state lock first."""
    home = crash_after_decision(tmp_path, server, template[0])
    paths = registry(home).paths(NAME)
    pending = [restore_marker(paths.state_dir), *paths.state_dir.glob("*.restore")]
    saved = {p: p.read_bytes() for p in pending}
    server.ok(home, "start", NAME)
    with boot(home) as tpm:
        write(tpm, LATER)
    server.ok(home, "stop", NAME)
    for command in (["snapshot", "create", NAME], ["start", NAME]):
        for path, data in saved.items():
            path.write_bytes(data)
        [finding] = [
            f
            for f in json.loads(server.run(home, "verify", NAME, "--json")[1])["findings"]
            if f["level"] != "ok"
        ]
        assert finding["check"] == "state.restore" and "out of date" in finding["what"]
        code, _, err, _ = server.run(home, *command)
        assert code == 0 and "dropped the interrupted restore of snapshot" in err, err
        assert not any(p.exists() for p in saved)
        server.run(home, "stop", NAME)
        assert nv_value(server, home) == LATER


def test_staging_leftovers_and_an_unreadable_marker(
    tmp_path: Path, server: Server, template: tuple[Path, dict[str, bytes | None]]
) -> None:
    """verify's advice about `*.restore` files (start removes them) and a garbled marker
    (start refuses, naming the one command that settles it) is true."""
    home = tmp_path / "h"
    shutil.copytree(template[0], home, symlinks=True)
    paths = registry(home).paths(NAME)
    staged = paths.state_dir / "tpm2-00.permall.restore"
    staged.write_bytes((paths.state_dir / "tpm2-00.permall").read_bytes())
    problems = verify_and_fix(server, home)
    assert [(f["check"], f["fix"]) for f in problems] == [
        ("state.leftover", f"vtpmctl start {NAME}")
    ]
    assert not staged.exists()
    server.ok(home, "stop", NAME)
    marker = restore_marker(paths.state_dir)
    marker.write_text("{garbled")
    code, _, err, _ = server.run(home, "start", NAME)
    assert code == 1 and err.count("\n") == 1 and f"rm {marker}" in err, err
    problems = verify_and_fix(server, home)
    assert [f["check"] for f in problems] == ["state.restore"] and not marker.exists()
    assert nv_value(server, home) == AFTER


def test_rotate_and_export_settle_a_pending_restore_first(
    tmp_path: Path, server: Server, template: tuple[Path, dict[str, bytes | None]]
) -> None:
    """A restore staged under the old key is finished before the key changes, and before
    an export reads the state."""
    home = crash_after_decision(tmp_path, server, template[0])
    new_key = key_file(tmp_path / "k2", b"two")
    code, _, err, _ = server.run(home, "key", "rotate", NAME, "--new-key-file", str(new_key))
    assert code == 0 and "finished the interrupted restore of snapshot" in err, err
    assert verify_and_fix(server, home) == []
    assert nv_value(server, home) == BEFORE
    shutil.rmtree(home)

    home = crash_after_decision(tmp_path, server, template[0])
    bundle = tmp_path / "vm.bundle"
    code, _, err, _ = server.run(home, "migrate", "export", NAME, "-o", str(bundle))
    assert code == 0 and "finished the interrupted restore of snapshot" in err, err
    assert not restore_marker(registry(home).paths(NAME).state_dir).exists()
    server.ok(home, "migrate", "import", str(bundle), "--name", "copy")
    server.ok(home, "start", "copy")
    copy = registry(home).paths("copy")
    with ControlClient(SocketTransport(str(copy.ctrl_socket))) as ctrl:
        ctrl.init()
    with DataClient(copy.data_socket) as tpm:
        assert rc(tpm.transact(t.build_startup(t.SU_CLEAR))) in (0, 0x100)
        assert nv_read(tpm.transact) == BEFORE
    server.ok(home, "stop", "copy")  # a daemon left running outlives the test
