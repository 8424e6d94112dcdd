"""vtpmctl's ``swtpm`` program with the command lines Proxmox VE and mkosi/systemd-vmspawn use.

Each test runs the program through the launchers ``vtpmctl swtpm-compat install`` writes,
boots QEMU (TCG, SeaBIOS, which starts the TPM and extends PCRs) on it, then opens the
state it left with tpm2-tools and with the real swtpm 0.7.1, and the reverse.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.interop.qemu_helpers import launch_qemu
from tests.interop.swtpm_peer import swtpm_socket
from vtpmctl.device.server import seccomp

ROOT = Path(__file__).resolve().parents[2]
SWTPM_REAL = shutil.which("swtpm", path="/usr/bin")
pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(
        SWTPM_REAL is None or shutil.which("qemu-system-x86_64") is None,
        reason="needs swtpm 0.7.1 and qemu-system-x86_64",
    ),
]
PERSISTENT = "0x81000001"


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, env=_env(), timeout=60, **kwargs)  # type: ignore[call-overload, no-any-return]


def _wait_gone(pid: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"swtpm {pid} still running {timeout}s after QEMU quit")


def _boot_qemu(run_dir: Path, ctrl: Path) -> None:
    """QEMU's firmware starts the TPM and extends PCRs; quitting QEMU ends swtpm."""
    vm = launch_qemu(run_dir / "vm", ctrl, device="tpm-crb")
    try:
        assert vm.running, vm.describe()
        vm.execute("cont")
        vm.wait_firmware()
        assert vm.quit() == 0
    finally:
        vm.kill()


def _proxmox_start(swtpm: Path, state: str, run_dir: Path, vmid: int) -> int:
    """qemu-server's swtpm command line; returns the daemon's pid from its pid file."""
    ctrl, pid_file, log = run_dir / "ctrl.sock", run_dir / "swtpm.pid", run_dir / "swtpm.log"
    res = _run(
        [
            str(swtpm),
            "socket",
            "--tpmstate",
            f"backend-uri=file://{state},mode=0600",
            "--ctrl",
            f"type=unixio,path={ctrl},mode=0600",
            "--pid",
            f"file={pid_file}",
            "--terminate",
            "--daemon",
            "--log",
            f"file={log},level=1,prefix=[id={vmid}]",
            "--tpm2",
        ]  # fmt: skip
    )
    assert res.returncode == 0, res.stderr
    assert ctrl.exists(), "the control socket must exist when swtpm --daemon returns"
    assert ctrl.stat().st_mode & 0o777 == 0o600
    return int(pid_file.read_text())


def _states(swtpm: str | Path, tpmstate: str) -> dict[str, object]:
    res = _run([str(swtpm), "socket", "--tpm2", "--tpmstate", tpmstate, "--print-states"])
    assert res.returncode == 0, res.stderr
    parsed: dict[str, object] = json.loads(res.stdout)
    return parsed


def _persist_key(exe: str | Path, tpmstate: str) -> str:
    """createprimary + evictcontrol through ``exe``; the key's name."""
    with swtpm_socket(exe=str(exe), extra_args=["--tpmstate", tpmstate]) as tpm:
        tpm.tpm2("createprimary", "-C", "o", "-c", str(tpm.run_dir / "p.ctx"))
        tpm.tpm2("evictcontrol", "-C", "o", "-c", str(tpm.run_dir / "p.ctx"), PERSISTENT)
        name = _key_name(tpm)
        tpm.shutdown()
    return name


def _key_name(tpm: object) -> str:
    out = tpm.tpm2("readpublic", "-c", PERSISTENT).stdout.decode()  # type: ignore[attr-defined]
    return next(line.split()[1] for line in out.splitlines() if line.startswith("name:"))


def _read_key(exe: str | Path, tpmstate: str) -> str:
    with swtpm_socket(exe=str(exe), extra_args=["--tpmstate", tpmstate]) as tpm:
        name = _key_name(tpm)
        assert len(tpm.tpm2("getrandom", "16").stdout) == 16
        tpm.shutdown()
    return name


def _proxmox_round(launchers: Path, run_dir: Path, state: str) -> None:
    """vtpmctl makes a key, QEMU boots on the Proxmox line, the real swtpm finds the key."""
    tpmstate = f"backend-uri=file://{state}"
    name = _persist_key(launchers / "swtpm", tpmstate)
    pid = _proxmox_start(launchers / "swtpm", state, run_dir, 101)
    _boot_qemu(run_dir, run_dir / "ctrl.sock")
    _wait_gone(pid)
    assert not (run_dir / "swtpm.pid").exists()
    ours = _states(launchers / "swtpm", tpmstate)
    assert ours == _states(SWTPM_REAL or "swtpm", tpmstate)
    assert [s["name"] for s in ours["states"]] == ["permall"]  # type: ignore[attr-defined]
    assert _read_key(SWTPM_REAL or "swtpm", tpmstate) == name


def test_proxmox_file_backend_on_a_plain_file(launchers: Path, run_dir: Path) -> None:
    state = run_dir / "vm-101-disk-1.raw"
    _proxmox_round(launchers, run_dir, str(state))
    # and the reverse: the real swtpm writes a linear file, vtpmctl opens it
    other = run_dir / "real.raw"
    name = _persist_key(SWTPM_REAL or "swtpm", f"backend-uri=file://{other}")
    assert _read_key(launchers / "swtpm", f"backend-uri=file://{other}") == name


def test_proxmox_file_backend_on_a_loop_block_device(
    launchers: Path, run_dir: Path, loop_device: str
) -> None:
    _proxmox_round(launchers, run_dir, loop_device)
    with open(loop_device, "rb") as dev:
        assert dev.read(8) == b"nilmptws"  # the linear file's magic, little-endian
    assert os.stat(loop_device).st_size == 0  # a block device: st_size says nothing


def test_mkosi_prebound_control_socket_as_fd3(launchers: Path, run_dir: Path) -> None:
    """mkosi and systemd-vmspawn bind the control socket and pass it as fd 3."""
    state = run_dir / "state"
    state.mkdir()
    name = _persist_key(SWTPM_REAL or "swtpm", f"dir={state}")  # a state dir the real swtpm wrote
    path = run_dir / "swtpm.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    fd = listener.fileno()
    with contextlib.ExitStack() as stack:
        stack.callback(listener.close)
        # the shell puts the socket on descriptor 3, as systemd-vmspawn hands it over
        proc = subprocess.Popen(
            [
                "bash",
                "-c",
                f'exec "$@" 3<&{fd} {fd}<&-',
                "bash",
                str(launchers / "swtpm"),
                "socket",
                "--tpm2",
                "--tpmstate",
                f"dir={state}",
                "--ctrl",
                "type=unixio,fd=3",
            ],  # fmt: skip
            env=_env(),
            pass_fds=(fd,),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        stack.callback(proc.kill)
        listener.close()
        _boot_qemu(run_dir, path)
        assert proc.wait(15) == 0, proc.stdout.read() if proc.stdout else ""
    assert _states(launchers / "swtpm", f"dir={state}") == _states(
        SWTPM_REAL or "swtpm", f"dir={state}"
    )
    assert _read_key(SWTPM_REAL or "swtpm", f"dir={state}") == name


@pytest.mark.parametrize("args", [[], ["--tpm2"]])
def test_print_capabilities_has_swtpms_keys(launchers: Path, args: list[str]) -> None:
    ours = json.loads(
        _run([str(launchers / "swtpm"), "socket", *args, "--print-capabilities"]).stdout
    )
    real = json.loads(_run([SWTPM_REAL or "swtpm", "socket", *args, "--print-capabilities"]).stdout)
    assert ours.keys() == real.keys()
    assert ours["version"] == real["version"] == "0.7.1"
    # what libvirt keys on is there; with the same libtpms, the very same words in order
    assert {"tpm-2.0", "cmdarg-pwd-fd", "nvram-backend-file"} <= set(ours["features"])
    filtered = seccomp.available()  # vtpmctl's filter is for x86-64 only
    assert ours["features"] == [w for w in real["features"] if filtered or w != "cmdarg-seccomp"]


GETRANDOM_8 = bytes.fromhex("80010000000c0000017b0008")
VENDOR_SET_LOCALITY_3 = bytes.fromhex("80010000000b2000100003")


def _ask(sock: socket.socket, command: bytes) -> bytes:
    sock.sendall(command)
    return sock.recv(4096)


def test_descriptors_ports_chardev_daemon_and_keys(launchers: Path, run_dir: Path) -> None:
    """swtpm_setup's socketpairs, chardev --fd, -p PORT with --locality, a failed --daemon
    start, and a key file others may read (accepted, with a warning in the log)."""
    swtpm = str(launchers / "swtpm")
    state = run_dir / "st"
    common = [swtpm, "socket", "--tpm2", "--tpmstate", f"dir={state}"]
    # --server type=tcp,fd= (a connected stream) and --ctrl clientfd=, as swtpm_setup runs it
    data, data_peer = socket.socketpair()
    ctrl, ctrl_peer = socket.socketpair()
    fds = (data_peer.fileno(), ctrl_peer.fileno())
    proc = subprocess.Popen(
        [
            *common,
            "--flags",
            "not-need-init,startup-clear",
            "--server",
            f"type=tcp,fd={fds[0]}",
            "--ctrl",
            f"type=unixio,clientfd={fds[1]}",
        ],  # fmt: skip
        pass_fds=fds,
        env=_env(),
    )
    data_peer.close()
    ctrl_peer.close()
    assert len(_ask(data, GETRANDOM_8)) == 20
    assert _ask(ctrl, b"\0\0\0\x03") == b"\0\0\0\0"  # CMD_SHUTDOWN
    assert proc.wait(15) == 0
    # chardev on a descriptor; the vendor SetLocality is refused unless allowed
    dev, dev_peer = socket.socketpair()
    proc = subprocess.Popen(
        [
            swtpm,
            "chardev",
            "--tpm2",
            "--tpmstate",
            f"dir={state}",
            "--flags",
            "startup-clear",
            "--fd",
            str(dev_peer.fileno()),
        ],  # fmt: skip
        pass_fds=(dev_peer.fileno(),),
        env=_env(),
    )
    dev_peer.close()
    assert len(_ask(dev, GETRANDOM_8)) == 20
    assert _ask(dev, VENDOR_SET_LOCALITY_3)[6:10] == b"\0\0\x01\x01"  # TPM_RC_FAILURE
    dev.close()
    assert proc.wait(15) == 0
    # -p PORT: one command per connection; allow-set-locality takes the vendor command
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [*common, "--flags", "startup-clear", "-p", str(port), "--locality", "allow-set-locality"],
        env=_env(),
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                conn = socket.create_connection(("127.0.0.1", port))
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        with conn:
            assert len(_ask(conn, GETRANDOM_8)) == 20
            assert conn.recv(10) == b""  # disconnected after the response
        with socket.create_connection(("127.0.0.1", port)) as conn:
            assert _ask(conn, VENDOR_SET_LOCALITY_3)[6:10] == b"\0\0\0\0"
        # a second TPM on the same state: --daemon reports the failure and exits 1
        res = _run(
            [
                *common,
                "--ctrl",
                f"type=unixio,path={run_dir / 'c2'}",
                "--flags",
                "not-need-init",
                "--daemon",
                "--pid",
                f"file={run_dir / 'pid2'}",
            ]  # fmt: skip
        )
        assert res.returncode == 1
        assert res.stderr.count("locked by another process") == 1, res.stderr
        assert not (run_dir / "pid2").exists() and not (run_dir / "c2").exists()
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
    # a 0644 hex key file is used, as swtpm does, with a warning in the log
    key = run_dir / "key"
    key.write_text("00112233445566778899aabbccddeeff\n")
    key.chmod(0o644)
    log = run_dir / "log"
    ctrl_path = run_dir / "c3"
    res = _run(
        [
            swtpm,
            "socket",
            "--tpm2",
            "--tpmstate",
            f"dir={run_dir / 'st2'}",
            "--ctrl",
            f"type=unixio,path={ctrl_path}",
            "--flags",
            "not-need-init",
            "--daemon",
            "--key",
            f"file={key}",
            "--log",
            f"file={log},level=1,prefix=[x] ",
            "--pid",
            f"file={run_dir / 'pid'}",
        ]  # fmt: skip
    )
    assert res.returncode == 0, res.stderr
    assert "[x] key file" in log.read_text() and "mode 0644" in log.read_text()
    pid = int((run_dir / "pid").read_text())
    subprocess.run(["swtpm_ioctl", "--unix", str(ctrl_path), "-s"], check=True, timeout=15)
    _wait_gone(pid)
    # the real swtpm opens the encrypted state with the same key
    with swtpm_socket(run_dir / "st2", extra_args=["--key", f"file={key}"], exe=SWTPM_REAL) as tpm:
        assert len(tpm.tpm2("getrandom", "8").stdout) == 8
        tpm.shutdown()


def _seccomp_mode(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Seccomp:")))


@pytest.mark.parametrize("seccomp", [[], ["--seccomp", "action=log"], ["--seccomp", "action=none"]])
def test_a_tpm_serves_under_the_seccomp_filter(launchers: Path, seccomp: list[str]) -> None:
    """swtpm's default is a filter that kills on a denied call; tpm2-tools work through it."""
    with swtpm_socket(exe=str(launchers / "swtpm"), extra_args=seccomp) as tpm:
        tpm.tpm2("createprimary", "-C", "o", "-c", str(tpm.run_dir / "p.ctx"))
        assert len(tpm.tpm2("getrandom", "16").stdout) == 16
        assert _seccomp_mode(tpm.proc.pid) == (0 if "action=none" in seccomp else 2)
        assert tpm.shutdown() == 0


def test_unix_sockets_get_the_owner_group_and_mode_given(launchers: Path, run_dir: Path) -> None:
    """--ctrl/--server type=unixio with uid=, gid= and mode=: chown and chmod of the sockets."""
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    data = run_dir / "data.sock"
    ctrl = run_dir / "data.sock.ctrl"  # where the swtpm TCTI looks for it
    proc = subprocess.Popen(
        [
            str(launchers / "swtpm"),
            "socket",
            "--tpm2",
            "--tpmstate",
            f"dir={run_dir}",
            "--flags",
            "startup-clear",
            "--ctrl",
            f"type=unixio,path={ctrl},mode=0640,uid=65534,gid=65534",
            "--server",
            f"type=unixio,path={data},mode=0604,gid=65534",
        ],  # fmt: skip
        env=_env(),
    )
    try:
        deadline = time.monotonic() + 15
        while not data.exists() or data.stat().st_gid != 65534:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        got = [(p.stat().st_uid, p.stat().st_gid, p.stat().st_mode & 0o7777) for p in (ctrl, data)]
        assert got == [(65534, 65534, 0o640), (0, 65534, 0o604)]
        res = subprocess.run(
            ["tpm2_getrandom", "-T", f"swtpm:path={data}", "8"], capture_output=True, timeout=30
        )
        assert res.returncode == 0 and len(res.stdout) == 8, res.stderr
    finally:
        subprocess.run(["swtpm_ioctl", "--unix", str(ctrl), "-s"], timeout=15, check=False)
        assert proc.wait(15) == 0


def test_chroot_with_a_state_key_makes_and_encrypts_a_new_tpm(
    launchers: Path, run_dir: Path
) -> None:
    """--chroot: nothing can be imported inside it, so what a key needs later (HMAC,
    libcrypto's AES) is loaded before. A new TPM writes its encrypted state there."""
    if os.geteuid() != 0:
        pytest.skip("chroot needs root")
    from vtpmctl.store.blob import AesKey, unwrap_file

    key = AesKey(os.urandom(32))
    key_file = run_dir / "key"
    key_file.write_text(key.material.hex())
    key_file.chmod(0o600)
    state = run_dir / "st"  # read before the chroot (empty: a new TPM) ...
    inside = run_dir / str(state).lstrip("/")  # ... and written inside it
    for d in (state, inside):
        d.mkdir(parents=True)
    ctrl = run_dir / "ctrl"
    res = _run(
        [
            str(launchers / "swtpm"),
            "socket",
            "--tpm2",
            "--tpmstate",
            f"dir={state}",
            "--ctrl",
            f"type=unixio,path={ctrl}",
            "--server",
            f"type=unixio,path={run_dir}/data",
            "--key",
            f"file={key_file},mode=aes-256-cbc",
            "--flags",
            "not-need-init,startup-clear",
            "--chroot",
            str(run_dir),
            "--pid",
            "file=/pid",
            "--log",
            f"file={run_dir}/log",
            "--daemon",
        ],  # fmt: skip
    )
    assert res.returncode == 0, res.stderr
    pid = int((run_dir / "pid").read_text())
    try:
        assert "/cryptography/" not in Path(f"/proc/{pid}/maps").read_text()
        assert _run(["swtpm_ioctl", "--unix", str(ctrl), "-s"]).returncode == 0
        _wait_gone(pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    log = (run_dir / "log").read_text()
    assert "Traceback" not in log and "failure mode" not in log, log
    permall = (inside / "tpm2-00.permall").read_bytes()
    assert permall[5] & 0x09 == 0x09  # encrypted, 256-bit key
    assert unwrap_file(permall, key)
    assert not (state / "tpm2-00.permall").exists()
