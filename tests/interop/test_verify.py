"""`vtpmctl verify` on real instances: each kind of damage is found, named and explained."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_inproc import Cli, in_process_cli
from instance_helpers import DataClient, Home, home_at, nv_define, nv_read, nv_write_cmd, rc

from vtpmctl.engine import tpm2 as t
from vtpmctl.store.blob import AesKey, unwrap_file, wrap_file
from vtpmctl.store.verify import Finding, verify_instance

FINDING_KEYS = {"level", "check", "what", "fix", "path"}


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


def findings(cli: Cli, name: str) -> tuple[int, dict[str, Any]]:
    code, out, _ = cli.run("verify", name, "--json", check=False)
    data = json.loads(out)
    assert data["format_version"] == 1 and data["instance"] == name
    for f in data["findings"]:
        assert set(f) == FINDING_KEYS and f["level"] in ("ok", "warn", "error")
    return code, data


def problems(data: dict[str, Any]) -> dict[str, str]:
    return {f["check"]: f["level"] for f in data["findings"] if f["level"] != "ok"}


def process_findings(home: Home, name: str) -> tuple[int, dict[str, Any]]:
    result = home.run("verify", name, "--json", check=False)
    data = json.loads(result.stdout)
    assert set(data) == {"format_version", "instance", "ok", "errors", "warnings", "findings"}
    return result.returncode, data


def test_healthy_instance_stopped_and_running(home: Home) -> None:
    home.run("create", "vm", "--no-ek")
    home.run("snapshot", "create", "vm")
    code, data = process_findings(home, "vm")
    assert code == 0 and data["ok"] is True and data["errors"] == 0 and data["warnings"] == 0
    checks = {f["check"] for f in data["findings"]}
    assert {
        "state.permall.format",
        "state.permall.validate",
        "lock",
        "snapshots",
        "dir.state",
    } <= checks
    text = home.run("verify", "vm")
    assert text.returncode == 0 and all(
        line.split()[0] == "ok" for line in text.stdout.splitlines()
    )

    home.run("start", "vm")
    code, data = process_findings(home, "vm")
    assert code == 0, data
    lock = next(f for f in data["findings"] if f["check"] == "lock")
    assert "running" in lock["what"] and str(home.status("vm")[1]["pid"]) in lock["what"]


def test_damage_is_reported(cli: Cli, tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_text(hashlib.sha256(b"k").hexdigest())
    key.chmod(0o600)
    cli.run("create", "vm", "--no-ek", "--key-file", str(key))
    cli.run("snapshot", "create", "vm")
    paths = cli.home.registry().paths("vm")
    permall = paths.state_dir / "tpm2-00.permall"
    good = permall.read_bytes()

    # a flipped ciphertext bit: the HMAC catches it
    raw = bytearray(good)
    raw[40] ^= 1
    permall.write_bytes(bytes(raw))
    code, data = findings(cli, "vm")
    assert code == 1 and problems(data).get("state.permall.hmac") == "error"
    hmac = next(f for f in data["findings"] if f["check"] == "state.permall.hmac")
    assert "HMAC" in hmac["what"] and hmac["fix"]

    # a truncated file: the header says so
    permall.write_bytes(good[:-7])
    assert problems(findings(cli, "vm")[1]).get("state.permall.format") == "error"

    # well-formed, correctly encrypted, but not a TPM state: libtpms says no
    permall.write_bytes(wrap_file(b"\x00" * 200, AesKey(bytes.fromhex(key.read_text()))))
    assert problems(findings(cli, "vm")[1]).get("state.permall.validate") == "error"

    # permissions, stale runtime files, a damaged snapshot object
    permall.write_bytes(good)
    permall.chmod(0o644)
    paths.state_key.chmod(0o640)
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    paths.pid_file.write_text("999999\n")
    (obj,) = (paths.base / "snapshots" / "objects").iterdir()
    obj.write_bytes(obj.read_bytes()[:-16])
    code, data = findings(cli, "vm")
    found = problems(data)
    assert code == 1
    assert found["state.permall.mode"] == "error"
    assert found["key.state"] == "error"
    assert found["stale"] == "warn"
    # the key cannot be trusted, so objects are not opened with it
    paths.state_key.chmod(0o600)
    found = problems(findings(cli, "vm")[1])
    assert found["snapshots.object"] == "error"
    assert "state.permall.validate" not in found
    code, out, err = cli.run("verify", "vm", "--quiet", check=False)
    assert code == 1
    assert all(line.split()[0] in ("warn", "error") for line in out.splitlines())
    assert "fix: chmod 600" in out
    assert "error(s)" in err


def test_missing_state_and_interrupted_restore(cli: Cli) -> None:
    cli.run("create", "vm", "--no-ek")
    paths = cli.home.registry().paths("vm")
    (paths.state_dir / "tpm2-00.permall").rename(paths.state_dir / "elsewhere")
    (paths.base / "restore.pending").write_text("{}")
    code, data = findings(cli, "vm")
    found = problems(data)
    assert code == 1 and found["state.permall"] == "error" and found["state.restore"] == "error"


def test_checks_in_process_with_fakes(cli: Cli) -> None:
    """The store-level API: validator and lock-holder are injected."""
    cli.run("create", "vm", "--no-ek")
    inst = cli.home.registry().get("vm")
    seen: list[set[str]] = []

    def validate(blobs: dict[str, bytes], tpm2: bool) -> tuple[dict[str, int], str | None]:
        seen.append(set(blobs))
        assert tpm2 and unwrap_file(wrap_file(blobs["permanent"], None), None)
        return {"permanent": 0x9A}, None

    result = verify_instance(inst, validate=validate)
    assert seen == [{"permanent"}]
    bad = [f for f in result if f.level == "error"]
    assert [f.check for f in bad] == ["state.permall.validate"] and "0x9a" in bad[0].what
    assert isinstance(bad[0], Finding) and bad[0].line().startswith("error")
    assert os.path.isdir(inst.paths.state_dir)


def test_every_fix_printed_is_a_command_that_loses_nothing(home: Home) -> None:
    """Leftovers of interrupted work, loose modes, stale files and a damaged snapshot: each
    fix verify prints is run as a shell command; then verify is clean and NV is intact."""
    home.run("create", "vm", "--no-ek")
    home.run("start", "vm")
    home.run("ctl", "vm", "init")
    with DataClient(home.registry().paths("vm").data_socket) as tpm:
        assert rc(tpm.transact(t.build_startup(t.SU_CLEAR))) == 0
        nv_define(tpm.transact)
        assert rc(tpm.transact(nv_write_cmd(b"keep-me!"))) == 0
    home.run("stop", "vm")
    home.run("snapshot", "create", "vm", "--label", "damaged")
    paths = home.registry().paths("vm")
    sd = paths.state_dir
    (sd / "tpm2-00.permall").chmod(0o644)
    for leftover in ("tpm2-00.permall.rotate", "tpm2-00.permall.restore", "TMP2-00.permall"):
        (sd / leftover).write_bytes(b"half-done")
    (obj,) = (paths.base / "snapshots" / "objects").iterdir()
    obj.with_name(obj.name + ".rekey").write_bytes(b"half-done")
    obj.write_bytes(obj.read_bytes()[:-16])
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    paths.pid_file.write_text("999999\n")

    env = dict(home.env, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    _, data = process_findings(home, "vm")
    fixed = []
    for f in data["findings"]:
        if f["level"] == "ok":
            continue
        assert re.match(r"(vtpmctl|rm|chmod) ", f["fix"] or ""), f
        done = subprocess.run(f["fix"], shell=True, env=env, capture_output=True, text=True)
        assert done.returncode == 0, (f, done.stderr)
        fixed.append(f["check"])
    assert {"state.permall.mode", "state.leftover", "snapshots.object", "stale"} <= set(fixed)
    code, data = process_findings(home, "vm")
    assert code == 0 and data["warnings"] == 0, data
    home.run("start", "vm")
    home.run("ctl", "vm", "init")
    with DataClient(paths.data_socket) as tpm:
        assert rc(tpm.transact(t.build_startup(t.SU_CLEAR))) in (0, 0x100)
        assert nv_read(tpm.transact) == b"keep-me!"


def test_snapshots_under_another_key_are_not_offered_for_removal(cli: Cli, tmp_path: Path) -> None:
    """Snapshots a key rotation never re-encrypted (a copy put back) are intact under their
    key: verify names the key, and suggests no `snapshot rm` that would lose them."""
    keys = []
    for seed in (b"one", b"two"):
        keys.append(tmp_path / seed.decode())
        keys[-1].write_text(hashlib.sha256(seed).hexdigest())
        keys[-1].chmod(0o600)
    cli.run("create", "vm", "--no-ek", "--key-file", str(keys[0]))
    cli.run("snapshot", "create", "vm")
    snapshots = cli.home.registry().paths("vm").base / "snapshots"
    old = {p: p.read_bytes() for p in snapshots.rglob("*") if p.is_file()}
    cli.run("key", "rotate", "vm", "--new-key-file", str(keys[1]))
    for path, data in old.items():
        path.write_bytes(data)
    code, data = findings(cli, "vm")
    bad = [f for f in data["findings"] if f["level"] != "ok"]
    assert code == 1 and [f["check"] for f in bad] == ["snapshots.key"], bad
    assert "snapshot rm" not in (bad[0]["fix"] or "")
