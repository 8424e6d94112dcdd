"""ControlClient and the caps/info/ctl/state commands against a real ``swtpm socket``.

Every case runs the client (in process) or the installed ``vtpmctl`` entry point
(as a subprocess) against swtpm, and where swtpm_ioctl can ask the same question
the answers are compared with its answers. Error cases use real local servers
that misbehave in one specific way; each must give exit code 1 and exactly one
line on stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from swtpm_peer import LOCALHOST, SwtpmPeer, swtpm_socket

from vtpmctl.device.client.control import ControlClient, ControlError, SocketTransport, TargetError
from vtpmctl.device.client.target import open_client
from vtpmctl.device.protocol import BlobType, Cap, Res

VTPMCTL = str(Path(sys.executable).with_name("vtpmctl"))
BLOB_TYPES = ("permanent", "volatile", "savestate")
KEY_HEX = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
MIGKEY_HEX = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100"
INFO_KEYS = {
    "format_version",
    "target",
    "caps",
    "running",
    "established",
    "tpm_specification",
    "tpm_attributes",
    "tpm_features",
    "runtime_algorithms",
    "runtime_commands",
    "active_profile",
    "available_profiles",
    "runtime_attributes",
    "config_flags",
    "state_key",
    "migration_key",
    "buffer_size",
    "buffer_size_min",
    "buffer_size_max",
}


# ---------------------------------------------------------------- helpers


def vt(
    *args: str, input: bytes | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[bytes]:
    """Run the installed vtpmctl entry point."""
    if input is None:
        return subprocess.run(
            [VTPMCTL, *args], capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    return subprocess.run([VTPMCTL, *args], capture_output=True, timeout=timeout, input=input)


def vt_typer(*args: str) -> subprocess.CompletedProcess[bytes]:
    """The same command line, forced through typer instead of the fast route."""
    code = "import sys; from vtpmctl.cli import run; sys.exit(run(sys.argv[1:], fast=False))"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def ok(result: subprocess.CompletedProcess[bytes]) -> bytes:
    assert result.returncode == 0, (result.returncode, result.stderr.decode())
    assert result.stderr == b""
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess[bytes], *needles: str) -> str:
    """Exit code 1, nothing on stdout, exactly one line on stderr containing the needles."""
    err = result.stderr.decode()
    assert result.returncode == 1, (result.returncode, err)
    assert result.stdout == b""
    assert err.endswith("\n") and err.count("\n") == 1, repr(err)
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def target_of(peer: SwtpmPeer) -> str:
    if peer.ctrl.kind == "unix":
        return f"unix:{peer.ctrl.path}"
    return f"tcp:{LOCALHOST}:{peer.ctrl.port}"


def ioctl_caps(peer: SwtpmPeer) -> int:
    out = peer.ioctl("-c").stdout.decode()
    match = re.search(r"0x([0-9a-fA-F]+)", out)
    assert match, out
    return int(match.group(1), 16)


def info_json(target: str) -> dict[str, Any]:
    data = json.loads(ok(vt("info", target, "--json")))
    assert isinstance(data, dict)
    assert set(data) == INFO_KEYS
    return data


@pytest.fixture(
    params=[(True, "unix"), (True, "tcp"), (False, "unix"), (False, "tcp")],
    ids=["tpm2-unix", "tpm2-tcp", "tpm12-unix", "tpm12-tcp"],
)
def peer(request: pytest.FixtureRequest) -> Iterator[SwtpmPeer]:
    """A running swtpm (not-need-init, startup-clear), both families, both ctrl kinds."""
    tpm2, ctrl = request.param
    with swtpm_socket(tpm2=tpm2, ctrl=ctrl, data="unix") as p:
        yield p


@pytest.fixture
def tpm2_peer() -> Iterator[SwtpmPeer]:
    with swtpm_socket(tpm2=True) as p:
        yield p


@pytest.fixture
def client(peer: SwtpmPeer) -> Iterator[ControlClient]:
    """Connects on first use; tests close it before running the CLI, because swtpm
    serves one control client at a time (the next would wait in the backlog)."""
    with open_client(target_of(peer)) as c:
        yield c


# ---------------------------------------------------------------- client and query commands


def test_caps_match_swtpm_ioctl(peer: SwtpmPeer, client: ControlClient) -> None:
    expected = ioctl_caps(peer)
    # The spec's 0x1ffff / 0x17fff are swtpm ≥ 0.8; 0.7.1 lacks LOCK_STORAGE.
    family = 0x1FFFF if peer.tpm2_mode else 0x17FFF
    assert expected | Cap.LOCK_STORAGE == family
    assert client.caps() == expected
    client.close()  # swtpm serves one control client at a time

    data = json.loads(ok(vt("caps", target_of(peer), "--json")))
    assert data["format_version"] == 1
    assert data["caps"] == expected
    assert data["caps_hex"] == f"{expected:#010x}"
    assert data["target"] == target_of(peer)
    assert data["unknown_bits"] == 0
    assert data["capabilities"]["init"] is True
    assert data["capabilities"]["send_command_header"] is peer.tpm2_mode
    assert data["capabilities"]["lock_storage"] is bool(expected & Cap.LOCK_STORAGE)
    assert len(data["capabilities"]) == 17

    human = ok(vt("caps", target_of(peer))).decode()
    assert f"{expected:#010x}" in human
    assert re.search(r"^set_datafd\s+yes$", human, re.M)


def test_info_matches_swtpm_ioctl(peer: SwtpmPeer, client: ControlClient) -> None:
    ioctl_info = json.loads(peer.ioctl("--info", "7").stdout)
    data = info_json(target_of(peer))
    assert data["format_version"] == 1
    assert data["tpm_specification"] == ioctl_info["TPMSpecification"]
    assert data["tpm_attributes"] == ioctl_info["TPMAttributes"]
    assert data["tpm_features"] == ioctl_info.get("TPMFeatures")
    assert data["tpm_specification"]["family"] == ("2.0" if peer.tpm2_mode else "1.2")
    assert data["running"] is True and data["established"] is False
    assert data["config_flags"] == 0 and data["state_key"] is False
    assert data["migration_key"] is False
    # swtpm_ioctl -b 0 prints the same three numbers.
    sizes = [int(n) for n in re.findall(r":\s*(\d+)", peer.ioctl("-b", "0").stdout.decode())]
    assert [data["buffer_size"], data["buffer_size_min"], data["buffer_size_max"]] == sizes
    assert client.get_info(0x07) == ioctl_info
    client.close()
    human = ok(vt("info", target_of(peer))).decode()
    assert re.search(r"^running\s+yes$", human, re.M)


def test_init_stop(peer: SwtpmPeer) -> None:
    target = target_of(peer)
    ok(vt("ctl", target, "stop"))
    data = info_json(target)
    assert data["running"] is False
    assert data["established"] is None  # not knowable while stopped
    assert data["tpm_specification"] is not None  # GET_INFO works while stopped
    one_line_error(
        vt("state", "export", target, "-o", os.devnull),
        "CMD_GET_STATEBLOB failed",
        "0xa",
        "not running",
    )
    ok(vt("ctl", target, "init"))
    assert info_json(target)["running"] is True
    ok(vt("ctl", target, "init", "--delete-volatile"))
    assert info_json(target)["running"] is True


def test_established_bit_via_hash_sequence(client: ControlClient, peer: SwtpmPeer) -> None:
    target = target_of(peer)
    assert client.get_established() is False
    client.hash_start()
    client.hash_data(b"\x5a" * 0x2000)  # more than one HASH_DATA piece
    client.hash_end()
    assert client.get_established() is True
    client.close()  # swtpm serves one control client at a time
    assert "tpmEstablished is 1" in peer.ioctl("-e").stdout.decode()
    assert info_json(target)["established"] is True
    ok(vt("ctl", target, "reset-established"))  # locality 3 by default
    assert info_json(target)["established"] is False


def test_locality(client: ControlClient, peer: SwtpmPeer) -> None:
    for loc in range(5):
        client.set_locality(loc)
    with pytest.raises(ControlError) as err:
        client.set_locality(5)
    assert err.value.result == Res.BAD_LOCALITY and err.value.cmd.name == "SET_LOCALITY"
    client.close()
    ok(vt("ctl", target_of(peer), "locality", "4"))
    ok(vt("ctl", target_of(peer), "locality", "0"))
    one_line_error(
        vt("ctl", target_of(peer), "locality", "5"),
        "CMD_SET_LOCALITY failed: TPM result 0x3d (TPM_BAD_LOCALITY)",
    )


def test_buffersize(client: ControlClient) -> None:
    cur, low, high = client.set_buffersize()
    assert (cur, high) == (4096, 4096) and 2048 < low < 4096
    with pytest.raises(ControlError) as err:
        client.set_buffersize(4000)  # only while stopped
    assert err.value.result == Res.BAD_ORDINAL
    assert "stop it first" in str(err.value) or "stopped" in str(err.value)
    client.stop()
    assert client.set_buffersize(4000) == (4000, low, high)
    assert client.set_buffersize(1) == (low, low, high)  # clamped
    client.set_buffersize(4096)
    client.init()
    assert client.set_buffersize(0)[0] == 4096


def test_store_volatile_cancel_and_lock_storage(client: ControlClient, peer: SwtpmPeer) -> None:
    client.store_volatile()
    volatile = "tpm2-00.volatilestate" if peer.tpm2_mode else "tpm-00.volatilestate"
    assert (peer.state_dir / volatile).exists()
    lock = bool(client.caps() & Cap.LOCK_STORAGE)
    client.close()
    target = target_of(peer)
    ok(vt("ctl", target, "store-volatile"))
    # swtpm 0.7.1 answers CMD_CANCEL_TPM_CMD on a TPM 1.2 socket with TPM_FAIL;
    # whatever swtpm_ioctl -C gets, we must get too.
    theirs = peer.ioctl("-C", check=False)
    if theirs.returncode == 0:
        ok(vt("ctl", target, "cancel"))
    else:
        code = re.search(rb"0x[0-9a-f]+", theirs.stderr + theirs.stdout)
        assert code is not None
        one_line_error(
            vt("ctl", target, "cancel"),
            f"CMD_CANCEL_TPM_CMD failed: TPM result {code.group().decode()}",
        )
    result = vt("ctl", target, "lock-storage", "10")
    if lock:
        ok(result)
    else:  # swtpm < 0.8 does not know the command
        one_line_error(result, "CMD_LOCK_STORAGE failed", "0xa")


def test_config_flags_with_keys(tmp_path: Path) -> None:
    key, migkey = tmp_path / "key", tmp_path / "migkey"
    key.write_text(KEY_HEX)
    migkey.write_text(MIGKEY_HEX)
    cases = [
        ([], 0),
        (["--key", f"file={key},format=hex,mode=aes-256-cbc"], 1),
        (["--migration-key", f"file={migkey},format=hex,mode=aes-256-cbc"], 2),
        (
            [
                "--key",
                f"file={key},format=hex,mode=aes-256-cbc",
                "--migration-key",
                f"file={migkey},format=hex,mode=aes-256-cbc",
            ],
            3,
        ),
    ]
    for extra, flags in cases:
        with swtpm_socket(extra_args=extra) as p:
            assert f"{flags:#x}" in p.ioctl("-g").stdout.decode()
            data = info_json(target_of(p))
            assert data["config_flags"] == flags
            assert data["state_key"] is bool(flags & 1)
            assert data["migration_key"] is bool(flags & 2)
            with open_client(target_of(p)) as c:
                assert c.get_config() == flags


# ---------------------------------------------------------------- state export / import


def differing(a: bytes, b: bytes) -> int:
    assert len(a) == len(b)
    return sum(x != y for x, y in zip(a, b, strict=True))


def test_export_matches_swtpm_ioctl_save(peer: SwtpmPeer, tmp_path: Path) -> None:
    target = target_of(peer)
    peer.ioctl("-v")  # not needed for GET, but a stored volatile state must not matter
    for kind in BLOB_TYPES:
        ours, theirs = tmp_path / f"ours.{kind}", tmp_path / f"theirs.{kind}"
        ok(vt("state", "export", target, "--type", kind, "-o", str(ours)))
        peer.ioctl("--save", kind, str(theirs))
        a, b = ours.read_bytes(), theirs.read_bytes()
        assert stat.S_IMODE(ours.stat().st_mode) == 0o600
        if kind == "volatile":
            # The volatile state carries the TPM clock and a digest over itself, so two
            # reads a moment apart differ in those bytes only.
            assert len(a) > 1000 and differing(a, b) <= 24
        else:
            assert a == b
        if kind == "savestate":
            assert a == b""  # a TPM 2 never has one; TPM 1.2 only after TPM_SaveState
    permanent = (tmp_path / "ours.permanent").read_bytes()
    assert len(permanent) > 1000
    # stdout gives the same bytes; an existing file is replaced, still 0600.
    assert ok(vt("state", "export", target, "-o", "-")) == permanent
    again = tmp_path / "ours.permanent"
    again.chmod(0o644)
    ok(vt("state", "export", target, "-o", str(again)))
    assert again.read_bytes() == permanent
    assert stat.S_IMODE(again.stat().st_mode) == 0o600


def test_export_into_devices_and_pipes(tpm2_peer: SwtpmPeer, tmp_path: Path) -> None:
    """A device or FIFO given with -o is written into, never replaced by a file."""
    target = target_of(tpm2_peer)
    ok(vt("state", "export", target, "-o", os.devnull))
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    ok(vt("state", "export", target, "-o", str(fifo)))
    reader.join(10)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert got and got[0] == ok(vt("state", "export", target, "-o", "-"))
    one_line_error(vt("state", "export", target, "-o", str(tmp_path)), "is a directory")
    one_line_error(
        vt("state", "export", target, "-o", str(tmp_path / "no" / "f")), "does not exist"
    )


def test_export_encrypted_keeps_state_key(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text(KEY_HEX)
    with swtpm_socket(extra_args=["--key", f"file={key},format=hex,mode=aes-256-cbc"]) as p:
        with open_client(target_of(p)) as c:
            plain_flags, plain = c.get_state(BlobType.PERMANENT)
            enc_flags, enc = c.get_state(BlobType.PERMANENT, decrypted=False)
        assert plain_flags == 0 and enc_flags == 2  # PTM_STATE_FLAG_ENCRYPTED
        assert plain != enc
        out = tmp_path / "enc.bin"
        ok(vt("state", "export", target_of(p), "--encrypted", "-o", str(out)))
        assert len(out.read_bytes()) == len(enc)
        # The same key on another swtpm opens it.
        with swtpm_socket(
            flags=None, extra_args=["--key", f"file={key},format=hex,mode=aes-256-cbc"]
        ) as q:
            ok(vt("state", "import", target_of(q), str(out)))
            ok(vt("ctl", target_of(q), "init"))
            with open_client(target_of(q)) as c:
                assert c.get_state(BlobType.PERMANENT) == (0, plain)


def test_import_all_types_then_init(peer: SwtpmPeer, tmp_path: Path) -> None:
    """Blobs exported by vtpmctl load into a second swtpm, which then initialises."""
    source = target_of(peer)
    files = {}
    for kind in BLOB_TYPES:
        files[kind] = tmp_path / kind
        ok(vt("state", "export", source, "--type", kind, "-o", str(files[kind])))
    with swtpm_socket(tpm2=peer.tpm2_mode, ctrl=peer.ctrl.kind, flags=None) as dest:
        target = target_of(dest)
        for kind in BLOB_TYPES:
            if kind == "permanent":
                ok(
                    vt(
                        "state",
                        "import",
                        target,
                        "--type",
                        kind,
                        "-",
                        input=files[kind].read_bytes(),
                    )
                )
            else:
                ok(vt("state", "import", target, "--type", kind, str(files[kind])))
        dest.ioctl("-i")  # swtpm_ioctl initialises from what vtpmctl staged
        with open_client(target) as c:
            assert c.get_state(BlobType.PERMANENT)[1] == files["permanent"].read_bytes()


def test_import_into_running_tpm_fails(peer: SwtpmPeer, tmp_path: Path) -> None:
    blob = tmp_path / "perm"
    ok(vt("state", "export", target_of(peer), "-o", str(blob)))
    one_line_error(
        vt("state", "import", target_of(peer), str(blob)),
        "CMD_SET_STATEBLOB failed",
        "0xa",
        "stop it first",
    )


def test_persistent_key_survives_move(tmp_path: Path) -> None:
    """A tpm2-tools persistent key keeps its name after export → import into another swtpm."""
    perm, vol = tmp_path / "perm.bin", tmp_path / "vol.bin"
    with swtpm_socket(tpm2=True) as a:
        a.tpm2(
            "createprimary",
            "-C",
            "o",
            "-g",
            "sha256",
            "-G",
            "ecc",
            "-c",
            str(tmp_path / "primary.ctx"),
        )
        a.tpm2("evictcontrol", "-C", "o", "-c", str(tmp_path / "primary.ctx"), "0x81000001")
        a.tpm2("readpublic", "-c", "0x81000001", "-n", str(tmp_path / "name.a"))
        ok(vt("state", "export", target_of(a), "-o", str(perm)))
        ok(vt("state", "export", target_of(a), "--type", "volatile", "-o", str(vol)))
    with swtpm_socket(tpm2=True, ctrl="tcp", data="tcp") as b:
        target = target_of(b)
        ok(vt("ctl", target, "stop"))
        ok(vt("state", "import", target, str(perm)))
        ok(vt("ctl", target, "init"))
        b.tpm2("startup", "-c")
        b.tpm2("readpublic", "-c", "0x81000001", "-n", str(tmp_path / "name.b"))
    assert (tmp_path / "name.a").read_bytes() == (tmp_path / "name.b").read_bytes()
    assert len((tmp_path / "name.a").read_bytes()) == 34  # sha256 name: alg + digest
    # With the volatile state too, the TPM resumes without TPM2_Startup.
    with swtpm_socket(tpm2=True, flags=None) as c:
        ok(vt("state", "import", target_of(c), str(perm)))
        ok(vt("state", "import", target_of(c), "--type", "volatile", str(vol)))
        ok(vt("ctl", target_of(c), "init", "--delete-volatile"))
        c.tpm2("readpublic", "-c", "0x81000001", "-n", str(tmp_path / "name.c"))
    assert (tmp_path / "name.c").read_bytes() == (tmp_path / "name.a").read_bytes()


def test_shutdown_ends_swtpm(tpm2_peer: SwtpmPeer) -> None:
    ok(vt("ctl", target_of(tpm2_peer), "shutdown"))
    assert tpm2_peer.wait_exit(5) == 0


def test_fast_route_and_typer_agree(tpm2_peer: SwtpmPeer) -> None:
    """The typer-free route and typer give the same output for the same command line."""
    target = target_of(tpm2_peer)
    for args in (
        ["caps", target, "--json"],
        ["caps", "--json", target],
        ["info", target],
        ["--timeout", "5", "info", target, "--json"],
        ["caps", target],
        ["ctl", target, "locality", "5"],
        ["ctl", target, "reset-established", "9"],
        ["ctl", target, "locality", "0"],
        ["caps", target + ".nope"],
    ):
        fast, slow = vt(*args), vt_typer(*args)
        assert (fast.returncode, fast.stdout, fast.stderr) == (
            slow.returncode,
            slow.stdout,
            slow.stderr,
        ), args


def test_state_export_refuses_terminal(tpm2_peer: SwtpmPeer) -> None:
    """A decrypted blob is a secret: never onto a terminal."""
    import pty

    leader, follower = pty.openpty()
    try:
        result = subprocess.run(
            [VTPMCTL, "state", "export", target_of(tpm2_peer), "-o", "-"],
            stdout=follower,
            stderr=subprocess.PIPE,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
    finally:
        os.close(follower)
        os.close(leader)
    assert result.returncode == 1
    assert result.stderr.decode().count("\n") == 1
    assert "terminal" in result.stderr.decode()


# ---------------------------------------------------------------- connection errors


@contextlib.contextmanager
def misbehaving_server(
    path: Path, reply: bytes | None, close: bool = True
) -> Iterator[threading.Event]:
    """A unix socket server that answers every connection with ``reply`` (None: never)."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(4)
    srv.settimeout(0.1)
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            conn.settimeout(1)
            with contextlib.suppress(OSError):
                conn.recv(64)
                if reply is not None:
                    conn.sendall(reply)
            if reply is not None and close:
                conn.close()
            else:
                held.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(2)
        for conn in held:
            conn.close()
        srv.close()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short private directory (AF_UNIX paths must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="vtc-", dir="/tmp"))
    try:
        yield path
    finally:
        path.chmod(0o700)
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


def test_error_no_such_socket(sockdir: Path) -> None:
    for spec in (f"unix:{sockdir}/nope", f"{sockdir}/nope"):
        one_line_error(vt("caps", spec), f"{sockdir}/nope", "no such socket")
    with pytest.raises(TargetError, match="no such socket"):
        ControlClient(SocketTransport(str(sockdir / "nope"))).caps()


def test_error_regular_file(sockdir: Path) -> None:
    path = sockdir / "file"
    path.write_text("not a socket")
    one_line_error(vt("caps", f"unix:{path}"), str(path), "not a socket")
    one_line_error(vt("info", str(path)), str(path), "not a socket")


def test_error_stale_socket(sockdir: Path) -> None:
    path = sockdir / "stale"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))  # bound, never listening: what a crashed server leaves behind
    try:
        one_line_error(vt("caps", f"unix:{path}"), "nothing is listening")
    finally:
        sock.close()


def test_error_connection_refused_tcp() -> None:
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        port = s.getsockname()[1]  # bound, not listening
        one_line_error(vt("caps", f"tcp:{LOCALHOST}:{port}"), "connection refused", str(port))


def test_error_permission_denied(sockdir: Path) -> None:
    """Root passes every permission check by its capabilities, so the CLI runs as root
    without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (setpriv), and is denied like
    anyone else."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root cannot be denied without setpriv to drop its capabilities")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
    path = sockdir / "tpm.ctrl"

    def caps() -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*prefix, VTPMCTL, "caps", f"unix:{path}"],
            capture_output=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )

    with misbehaving_server(path, reply=bytes(8)):
        sockdir.chmod(0o000)  # the socket's directory cannot be searched
        one_line_error(caps(), "permission denied", str(path))
        sockdir.chmod(0o700)
        path.chmod(0o000)  # the directory is fine, the socket is not writable
        one_line_error(caps(), "permission denied", str(path))
        path.chmod(0o600)
        assert json.loads(ok(vt("caps", f"unix:{path}", "--json")))["caps"] == 0


@pytest.mark.parametrize(
    "reply, needle",
    [
        (b"HTTP/1.0 400 Bad Request\r\n\r\n", "no TPM result"),
        (b"\x00\x00", "short reply"),
        (b"", "without answering"),
    ],
    ids=["garbage", "short", "eof"],
)
def test_error_not_a_tpm(sockdir: Path, reply: bytes, needle: str) -> None:
    with misbehaving_server(sockdir / "ctrl", reply=reply):
        one_line_error(vt("caps", f"unix:{sockdir}/ctrl"), needle, "TPM control channel")
        one_line_error(vt("info", f"unix:{sockdir}/ctrl", "--json"), needle)


def test_error_timeout(sockdir: Path) -> None:
    with misbehaving_server(sockdir / "ctrl", reply=None):
        start = time.monotonic()
        result = vt("--timeout", "1", "caps", f"unix:{sockdir}/ctrl")
        elapsed = time.monotonic() - start
        one_line_error(result, "no reply within 1 s")
        assert elapsed < 8
        with pytest.raises(TargetError, match="no reply"):
            ControlClient(SocketTransport(str(sockdir / "ctrl"), timeout=0.3)).caps()


def test_error_data_channel_is_not_control(tpm2_peer: SwtpmPeer) -> None:
    """A common mistake: the data socket waits for a 10-byte header and never answers."""
    one_line_error(
        vt("--timeout", "1", "caps", f"unix:{tpm2_peer.data.path}"),
        "no reply within 1 s",
        "control channel",
    )


def test_errors_are_short_with_debug_traceback(sockdir: Path) -> None:
    result = vt("--debug", "caps", f"unix:{sockdir}/nope")
    assert result.returncode == 1
    assert b"Traceback" in result.stderr and b"TargetError" in result.stderr


def test_cuse_and_instance_targets_are_one_line_errors() -> None:
    one_line_error(vt("caps", "/dev/vtpm-nothere"), "/dev/vtpm-nothere: no such device")
    one_line_error(vt("info", "myvm"), "no instance named myvm; see vtpmctl list")
