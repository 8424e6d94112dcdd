"""Named instances end to end: the CLI, real daemons, tpm2-tools and a real swtpm.

Every test has its own VTPMCTL_HOME under tmp_path; daemons left running are killed.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from instance_helpers import (
    DataClient,
    Home,
    home_at,
    nv_define,
    nv_read,
    nv_write_cmd,
    processes_serving,
    rc,
)
from swtpm_peer import swtpm_socket

from vtpmctl.engine import tpm2 as t

STATUS_KEYS = {
    "format_version",
    "name",
    "state",
    "pid",
    "tpm",
    "state_dir",
    "endpoints",
    "transport",
    "encrypted",
    "created",
    "libtpms_version",
}
MARKER = b"vtpmctl-nv-marker-0123456789abcd"  # 32 bytes


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    with home_at(tmp_path / "h") as h:
        yield h


def key_file(tmp_path: Path, kind: str = "hex", mode: int = 0o600, seed: bytes = b"k") -> Path:
    material = hashlib.sha256(seed).digest()
    path = tmp_path / f"{kind}-{seed.decode()}.key"
    path.write_bytes(
        {
            "hex": material.hex().encode() + b"\n",
            "binary": material,
            "passphrase": b"correct horse " + seed,
        }[kind]
    )
    path.chmod(mode)
    return path


def state_files(home: Home, name: str) -> dict[str, bytes]:
    d = home.registry().paths(name).state_dir
    return {p.name: p.read_bytes() for p in d.iterdir() if p.name != ".lock"}


def one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vtpmctl: ")
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def boot(home: Home, name: str) -> None:
    """What firmware does first: CMD_INIT, then TPM2_Startup(CLEAR)."""
    home.run("ctl", name, "init")
    home.tpm2(name, "startup", "-c")


def write_marker(home: Home, name: str, data: bytes = MARKER) -> None:
    home.tpm2(
        name,
        "nvdefine",
        "0x1500016",
        "-C",
        "o",
        "-s",
        str(len(data)),
        "-a",
        "ownerread|ownerwrite",
        check=False,
    )
    home.tpm2(name, "nvwrite", "0x1500016", "-C", "o", "-i", "-", input=data)


def read_marker(home: Home, name: str, size: int = len(MARKER)) -> bytes:
    return home.tpm2(name, "nvread", "0x1500016", "-C", "o", "-s", str(size)).stdout


# ---------------------------------------------------------------- lifecycle


def test_tpm2_lifecycle(home: Home) -> None:
    out = home.run("create", "vm1", "--no-ek").stdout
    assert "created vm1" in out
    listing = home.json("list")
    assert listing["format_version"] == 1
    assert [i["name"] for i in listing["instances"]] == ["vm1"]
    code, st = home.status("vm1")
    assert code == 3 and st["state"] == "stopped" and st["pid"] is None
    assert set(st) >= STATUS_KEYS
    assert st["tpm"] == "2.0" and st["ek"] is False

    home.run("start", "vm1")
    code, st = home.status("vm1")
    assert code == 0 and st["state"] == "running" and st["owner"] == "vtpmctl"
    paths = home.registry().paths("vm1")
    assert st["pid"] == int(paths.pid_file.read_text())
    assert st["endpoints"] == {
        "ctrl": f"unix:{paths.ctrl_socket}",
        "data": f"unix:{paths.data_socket}",
        "device": None,
    }
    assert Path(st["state_dir"], "tpm2-00.permall").is_file()
    # caps/info accept the name as TARGET
    assert home.json("caps", "vm1")["capabilities"]["init"] is True
    assert "already running" in home.run("start", "vm1").stdout

    boot(home, "vm1")
    write_marker(home, "vm1")
    assert read_marker(home, "vm1") == MARKER
    assert home.json("info", "vm1")["running"] is True

    old_pid = st["pid"]
    home.run("restart", "vm1")
    code, st = home.status("vm1")
    assert code == 0 and st["pid"] != old_pid
    boot(home, "vm1")
    assert read_marker(home, "vm1") == MARKER

    assert "stopped vm1" in home.run("stop", "vm1").stdout
    code, st = home.status("vm1")
    assert code == 3 and st["stale_files"] == []
    assert not paths.pid_file.exists() and not paths.ctrl_socket.exists()
    assert "not running" in home.run("stop", "vm1").stdout

    home.run("rm", "vm1", "--yes")
    assert home.json("list")["instances"] == []
    assert not paths.base.exists() and not paths.secrets_dir.exists()
    code, st = home.status("vm1")
    assert code == 4 and st["state"] == "unknown" and "no instance named" in st["error"]


def test_tpm12_lifecycle(home: Home) -> None:
    home.run("create", "old", "--tpm", "1.2")
    code, st = home.status("old")
    assert code == 3 and st["tpm"] == "1.2" and st["ek"] is False
    assert Path(st["state_dir"], "tpm-00.permall").is_file()
    for _ in range(2):  # the second start opens the state the first one saved
        home.run("start", "old")
        code, st = home.status("old")
        assert code == 0
        home.run("ctl", "old", "init")
        with DataClient(Path(st["endpoints"]["data"][5:])) as tpm:
            assert rc(tpm.transact(bytes.fromhex("00c10000000c000000990001"))) in (0, 0x26)
            resp = tpm.transact(bytes.fromhex("00c10000000e0000004600000010"))
            assert resp[:2] == b"\x00\xc4" and rc(resp) == 0 and len(resp) == 14 + 16
        home.run("stop", "old")
    assert home.status("old")[0] == 3
    home.run("rm", "old", "--yes")


def test_ek_certificate_matches_tpm(home: Home, tmp_path: Path) -> None:
    home.run("create", "ek")
    data = home.json("ek", "export", "ek")
    assert data["format_version"] == 1 and data["locked"] is True
    by_alg = {e["algorithm"]: e for e in data["eks"]}
    assert by_alg["rsa2048"]["handle"] == "0x81010001"
    assert by_alg["rsa2048"]["cert_nv_index"] == "0x01c00002"
    assert data["platform_certificate_pem"].startswith("-----BEGIN CERTIFICATE")
    pem = home.run("ek", "export", "ek", "--pem").stdout
    assert pem.count("BEGIN PUBLIC KEY") == 2 and pem.count("BEGIN CERTIFICATE") == 3
    assert "rsa2048" in home.run("ek", "export", "ek").stdout

    home.run("start", "ek")
    boot(home, "ek")
    for alg, ek in by_alg.items():
        out = tmp_path / f"{alg}.pem"
        home.tpm2("ek", "readpublic", "-c", ek["handle"], "-f", "pem", "-o", str(out))
        tpm_key = serialization.load_pem_public_key(out.read_bytes())
        cert = x509.load_pem_x509_certificate(ek["certificate_pem"].encode())
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        assert cert.public_key().public_bytes(der, spki) == tpm_key.public_bytes(der, spki)
        assert ek["public_key_pem"].encode() == tpm_key.public_bytes(
            serialization.Encoding.PEM, spki
        )
        nv = home.tpm2("ek", "nvread", ek["cert_nv_index"], "-C", "o").stdout
        assert nv == cert.public_bytes(der)


def test_status_exit_codes_and_stale_files(home: Home) -> None:
    assert home.run("status", "nope", check=False).returncode == 4
    home.run("create", "s", "--no-ek")
    home.run("start", "s")
    _, st = home.status("s")
    os.kill(st["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 5
    while home.status("s")[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    code, st = home.status("s")
    assert code == 1 and st["state"] == "stale" and st["pid"] is None
    assert any(f.endswith("/pid") for f in st["stale_files"])
    human = home.run("status", "s", check=False)
    assert human.returncode == 1 and "stale" in human.stdout
    home.run("start", "s")  # cleans the leftovers and opens the state again
    assert home.status("s")[0] == 0
    home.run("stop", "s")
    assert home.status("s")[0] == 3


def test_concurrent_starts_make_one_daemon(home: Home) -> None:
    home.run("create", "c", "--no-ek")
    state_dir = home.registry().paths("c").state_dir
    for _ in range(3):
        procs = [
            subprocess.Popen(
                [*home_cli(), "start", "c"],
                env=home.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        results = [p.communicate(timeout=60) + (p.returncode,) for p in procs]
        assert [r[2] for r in results] == [0, 0], results
        assert sum("already running" in r[0] for r in results) == 1, results
        assert len(processes_serving(state_dir)) == 1
        assert home.status("c")[0] == 0
        home.run("stop", "c")
        assert processes_serving(state_dir) == []


@pytest.mark.parametrize("module", ["vtpmctl", "vtpmctl.device.server.daemon"])
def test_status_and_stop_know_daemons_of_earlier_versions(home: Home, module: str) -> None:
    """A daemon started as `python -m vtpmctl.device.server.daemon` (before the stable
    `python -m vtpmctl _daemon`) is still this instance's daemon after an upgrade."""
    from vtpmctl.usecases.supervisor import daemon_argv

    home.run("create", "old", "--no-ek")
    inst = home.registry().get("old")
    argv = daemon_argv(inst)
    at = argv.index("-m")
    if module != "vtpmctl":
        argv[at + 1 : at + 3] = [module]
    proc = subprocess.Popen(
        argv, env=home.env, stdin=subprocess.DEVNULL, start_new_session=True, cwd="/"
    )
    try:
        deadline = time.monotonic() + 20
        while home.status("old")[0] != 0 and time.monotonic() < deadline:
            assert proc.poll() is None, "the daemon exited"
            time.sleep(0.05)
        code, st = home.status("old")
        assert code == 0 and st["owner"] == "vtpmctl" and st["pid"] == proc.pid
        assert processes_serving(inst.paths.state_dir) == [proc.pid]
        assert "stopped old" in home.run("stop", "old").stdout
        assert proc.wait(10) == 0
        assert home.status("old")[0] == 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def home_cli() -> list[str]:
    from instance_helpers import VTPMCTL

    return VTPMCTL


def test_state_locked_by_swtpm(home: Home) -> None:
    home.run("create", "busy", "--no-ek")
    state_dir = home.registry().paths("busy").state_dir
    with swtpm_socket(state_dir, tpm2=True) as peer:
        result = home.run("start", "busy", check=False)
        one_line_error(result, "locked by pid", str(peer.proc.pid), "swtpm")
        code, st = home.status("busy")
        assert code == 0 and st["owner"] == "other" and st["pid"] == peer.proc.pid
        one_line_error(home.run("stop", "busy", check=False), "not its vtpmctl daemon")
        one_line_error(home.run("rm", "busy", "--yes", check=False), "stop that process yourself")
        assert peer.running
        peer.shutdown()
    home.run("start", "busy")
    assert home.status("busy")[0] == 0


# ---------------------------------------------------------------- keys and corruption


def test_key_file_errors(home: Home, tmp_path: Path) -> None:
    loose = key_file(tmp_path, mode=0o644, seed=b"loose")
    one_line_error(
        home.run("create", "k", "--no-ek", "--key-file", str(loose), check=False), "chmod 600"
    )
    one_line_error(
        home.run("create", "k", "--no-ek", "--key-file", str(tmp_path / "none"), check=False),
        "does not exist",
    )
    assert home.json("list")["instances"] == []
    assert not home.registry().paths("k").base.exists()

    good = key_file(tmp_path)
    home.run("create", "k", "--no-ek", "--key-file", str(good))
    paths = home.registry().paths("k")
    before = state_files(home, "k")
    stored = paths.state_key.read_bytes()

    def refused(*needles: str) -> None:
        one_line_error(home.run("start", "k", check=False), *needles)
        assert home.status("k")[0] == 3
        assert state_files(home, "k") == before
        assert processes_serving(paths.state_dir) == []

    paths.state_key.chmod(0o644)
    refused("chmod 600")
    paths.state_key.chmod(0o600)
    paths.state_key.write_bytes(hashlib.sha256(b"wrong").hexdigest().encode())
    refused("not the key")
    # Without the recorded fingerprint the state itself refuses the key.
    meta = paths.meta_file.read_text().replace('"key_fingerprint": "', '"x": "')
    paths.meta_file.write_text(meta)
    refused("unusable", "check the state key")
    paths.state_key.unlink()
    refused("missing")
    paths.state_key.write_bytes(stored)
    paths.state_key.chmod(0o600)
    home.run("start", "k")
    assert home.status("k")[0] == 0


@pytest.mark.parametrize("encrypted", [False, True])
def test_corrupt_or_missing_state(home: Home, tmp_path: Path, encrypted: bool) -> None:
    args = ["--key-file", str(key_file(tmp_path))] if encrypted else []
    home.run("create", "bad", "--no-ek", *args)
    permall = home.registry().paths("bad").state_dir / "tpm2-00.permall"
    good = permall.read_bytes()
    variants = (
        [good[:-7], good[:40] + bytes([good[40] ^ 1]) + good[41:]]
        if encrypted
        else [good[:-7], b"\xff" + good[1:]]
    )
    for bad in variants:
        permall.write_bytes(bad)
        one_line_error(home.run("start", "bad", check=False), "unusable")
        assert permall.read_bytes() == bad
        assert home.status("bad")[0] == 3
    if not encrypted:
        # Header and TLV intact, libtpms' own data damaged: refused at start (ValidateState),
        # not left to put the TPM into failure mode later.
        body = bytearray(good)
        body[200] ^= 0xFF
        body[201] ^= 0xFF
        permall.write_bytes(bytes(body))
        one_line_error(home.run("start", "bad", check=False), "corrupt", "restore it")
        assert permall.read_bytes() == bytes(body)
        assert home.status("bad")[0] == 3
    permall.unlink()
    one_line_error(home.run("start", "bad", check=False), "is missing", "will not make")
    assert not permall.exists()
    permall.write_bytes(good)
    home.run("start", "bad")


SWTPM_KEY = {
    "hex": "file={},mode=aes-256-cbc,format=hex",
    "binary": "file={},mode=aes-256-cbc,format=binary",
    "passphrase": "pwdfile={},mode=aes-256-cbc",
}


@pytest.mark.parametrize("kind", ["hex", "binary", "passphrase"])
def test_swtpm_opens_encrypted_state_and_back(home: Home, tmp_path: Path, kind: str) -> None:
    key = key_file(tmp_path, kind)
    home.run("create", "enc", "--no-ek", "--key-file", str(key), "--key-format", kind)
    assert home.status("enc")[1]["encrypted"] is True
    home.run("start", "enc")
    boot(home, "enc")
    write_marker(home, "enc")
    home.run("stop", "enc")
    files = state_files(home, "enc")
    assert files and all(MARKER not in data and MARKER[:12] not in data for data in files.values())

    state_dir = home.registry().paths("enc").state_dir
    swtpm_key = ["--key", SWTPM_KEY[kind].format(key)]
    with swtpm_socket(state_dir, tpm2=True, extra_args=swtpm_key) as peer:
        got = peer.tpm2("nvread", "0x1500016", "-C", "o", "-s", "32").stdout
        assert got == MARKER
        peer.tpm2("nvwrite", "0x1500016", "-C", "o", "-i", "-", input=MARKER[::-1])
        peer.shutdown()
    home.run("start", "enc")
    boot(home, "enc")
    assert read_marker(home, "enc") == MARKER[::-1]


def test_key_rotate(home: Home, tmp_path: Path) -> None:
    old, new = key_file(tmp_path, seed=b"old"), key_file(tmp_path, seed=b"new")
    home.run("create", "rot", "--no-ek", "--key-file", str(old))
    home.run("start", "rot")
    boot(home, "rot")
    write_marker(home, "rot")
    one_line_error(
        home.run("key", "rotate", "rot", "--new-key-file", str(new), check=False),
        "is running",
        "stop it first",
    )
    home.run("stop", "rot")
    before = state_files(home, "rot")
    loose = key_file(tmp_path, seed=b"loose", mode=0o640)
    one_line_error(
        home.run("key", "rotate", "rot", "--new-key-file", str(loose), check=False), "chmod 600"
    )
    assert state_files(home, "rot") == before
    out = home.run("key", "rotate", "rot", "--new-key-file", str(new)).stdout
    assert "re-encrypted rot" in out
    assert state_files(home, "rot") != before
    home.run("start", "rot")
    boot(home, "rot")
    assert read_marker(home, "rot") == MARKER
    home.run("stop", "rot")
    state_dir = home.registry().paths("rot").state_dir
    with swtpm_socket(
        state_dir, tpm2=True, extra_args=["--key", f"file={new},mode=aes-256-cbc,format=hex"]
    ) as peer:
        assert peer.tpm2("nvread", "0x1500016", "-C", "o", "-s", "32").stdout == MARKER
        peer.shutdown()


def test_migration_key_is_kept(home: Home, tmp_path: Path) -> None:
    mig = key_file(tmp_path, seed=b"mig")
    home.run("create", "m", "--no-ek", "--migration-key-file", str(mig))
    paths = home.registry().paths("m")
    assert (paths.migration_key.stat().st_mode & 0o777) == 0o600
    home.run("start", "m")
    assert home.json("info", "m")["migration_key"] is True


# ---------------------------------------------------------------- command-line errors


def test_rm_needs_confirmation_and_a_stopped_instance(home: Home) -> None:
    home.run("create", "r", "--no-ek")
    one_line_error(home.run("rm", "r", check=False), "--yes")
    home.run("start", "r")
    one_line_error(home.run("rm", "r", "--yes", check=False), "stop it first")
    home.run("stop", "r")
    home.run("rm", "r", "-y")
    one_line_error(home.run("rm", "r", "--yes", check=False), "no instance named r")


def test_create_errors(home: Home) -> None:
    home.run("create", "dup", "--no-ek")
    one_line_error(home.run("create", "dup", "--no-ek", check=False), "exists already")
    one_line_error(home.run("create", "a/b", check=False), "invalid instance name")
    one_line_error(home.run("create", "x", "--tpm", "1.2", "--ek", check=False), "TPM 2.0 only")
    one_line_error(home.run("start", "ghost", check=False), "no instance named ghost")
    one_line_error(home.run("ctl", "dup", "init", check=False), "not running", "vtpmctl start")
    assert [i["name"] for i in home.json("list")["instances"]] == ["dup"]


def test_raw_nv_helpers(home: Home) -> None:
    """The raw client the crash test relies on agrees with tpm2-tools."""
    home.run("create", "raw", "--no-ek")
    home.run("start", "raw")
    boot(home, "raw")
    _, st = home.status("raw")
    with DataClient(Path(st["endpoints"]["data"][5:])) as tpm:
        nv_define(tpm.transact)
        assert rc(tpm.transact(nv_write_cmd(b"12345678"))) == 0
        assert nv_read(tpm.transact) == b"12345678"
    assert home.tpm2("raw", "nvread", "0x1500016", "-C", "o", "-s", "8").stdout == b"12345678"
    assert t.RH_OWNER == 0x40000001


def test_foreground_with_notify_socket(home: Home, tmp_path: Path) -> None:
    """What the Type=notify unit runs: READY=1 once serving, SIGTERM saves and exits."""
    from instance_helpers import VTPMCTL

    home.run("create", "fg", "--no-ek")
    notify_path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(30)
        proc = subprocess.Popen(
            [*VTPMCTL, "start", "--foreground", "fg"],
            env=dict(home.env, NOTIFY_SOCKET=str(notify_path)),
        )
        try:
            assert b"READY=1" in notify.recv(4096).split(b"\n")
            code, st = home.status("fg")
            assert code == 0 and st["pid"] == proc.pid  # the unit's main pid is the daemon
            boot(home, "fg")
            write_marker(home, "fg")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    assert home.status("fg")[0] == 3
    home.run("start", "fg")
    boot(home, "fg")
    assert read_marker(home, "fg") == MARKER
