"""Acceptance: a libvirt domain runs on a vtpmctl instance with no glue (README, "libvirt").

The instance is made with the socket-access options, started the way the systemd unit
starts it (its ExecStart, UMask and Type=notify; an encrypted one whose keys come on
descriptors by `vtpmctl start --key pwdfd=N`), and its <tpm> element comes from
`vtpmctl libvirt xml`. Then the domain goes through start, destroy, start, save,
restore, managedsave + start, kill -9 of QEMU + start and a guest reboot, back to
back, while nobody touches the instance: the same daemon serves every QEMU, and
`vtpmctl info`/`caps`/`status` answer within a second while a VM runs (the admin
endpoint beside the control socket).

How the test sees what the firmware did: the last run ends with `virsh destroy`, so
QEMU sends CMD_SHUTDOWN and the daemon first sends TPM2_Shutdown(SU_STATE). The test
is then the next "VM run" itself: it hands the daemon a data channel with
CMD_SET_DATAFD as QEMU does, sends CMD_INIT, TPM2_Startup(SU_STATE) and reads PCRs
0-7, which must hold OVMF's measurements (non-zero).

libvirt comes from tests/interop/libvirt_harness.py (its own virtlogd + libvirtd under
the machine-wide lock); boots are shared and the firmware is waited for only where its
measurements matter.
"""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from instance_helpers import VTPMCTL, Home, home_at, pcrs_after_resume
from libvirt_harness import Domain, Libvirt, libvirt_session, unavailable

pytestmark = [
    pytest.mark.libvirt,
    pytest.mark.skipif(unavailable() is not None, reason=str(unavailable())),
]

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "vtpmctl@.service"
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
QEMU_GROUP = "libvirt-qemu"  # Debian's libvirt runs QEMU as libvirt-qemu
FIRMWARE_PCRS = range(8)


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    """A short path QEMU (libvirt-qemu) may pass through: socket paths must fit 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="vl-", dir="/tmp"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def lv(work: Path) -> Iterator[Libvirt]:
    with libvirt_session(work / "libvirt") as session:
        yield session


@dataclass
class UnitInstance:
    """One instance run as `systemctl start vtpmctl@NAME` would run it."""

    home: Home
    name: str
    proc: subprocess.Popen[bytes]

    def stop(self) -> int:
        """systemctl stop: SIGTERM, a clean exit."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


def unit_start(home: Home, name: str) -> UnitInstance:
    """The unit's ExecStart with %i, in systemd's PATH, with its UMask; waits for READY=1."""
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(UNIT)
    svc = unit["Service"]
    argv = [arg.replace("%i", name) for arg in shlex.split(svc["ExecStart"])]
    exe = argv[0] if os.path.isabs(argv[0]) else shutil.which(argv[0], path=SYSTEMD_PATH)
    assert exe and os.access(exe, os.X_OK), f"{argv[0]} is not installed; run scripts/setup"
    umask = int(svc["UMask"], 8)
    env = dict(home.env, PATH=SYSTEMD_PATH)
    notify_path = home.path.parent / f"notify-{name}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(30)
        proc = subprocess.Popen(
            [exe, *argv[1:]],
            env=dict(env, NOTIFY_SOCKET=str(notify_path)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=lambda: os.umask(umask),
        )
        try:
            messages = b""
            while b"READY=1" not in messages:
                messages += notify.recv(4096)
        except TimeoutError:
            proc.kill()
            raise AssertionError(f"no READY=1: {proc.communicate()[1].decode()}") from None
    notify_path.unlink()
    return UnitInstance(home, name, proc)


def answers_while_running(home: Home, name: str) -> None:
    """QEMU holds the control channel: queries go to the admin endpoint, at once.

    Without it, they would wait 10 s for the channel. The best of two runs is timed:
    on a loaded machine starting the CLI alone can take most of a second.
    """
    for command, limit in (("info", 1.0), ("caps", 3.0), ("status", 3.0)):
        times = []
        for _ in range(2):
            t0 = time.monotonic()
            home.run(command, name)
            times.append(time.monotonic() - t0)
        assert min(times) < limit, f"vtpmctl {command} {name} took {times} while the VM runs"


def back_to_back(dom: Domain, save_file: Path, home: Home, name: str, *, full: bool) -> None:
    """Every way libvirt ends and begins a VM run, with nothing done to the instance.

    ``full`` also lets the firmware finish before the save (so the save file carries
    its measurements) and has the guest reboot itself; each costs a boot (5-20 s
    under TCG).
    """
    dom.start()
    answers_while_running(home, name)
    dom.destroy()
    dom.start()  # a new run: its CMD_INIT powers the TPM on again
    if full:
        dom.wait_firmware()
    dom.save(save_file)  # the TPM state goes into the save file; QEMU exits
    dom.restore(save_file)
    dom.managedsave()
    dom.start()  # resumes from the managed save
    dom.kill_qemu()  # no CMD_SHUTDOWN at all
    dom.start()
    dom.wait_firmware()  # the measurements the test reads at the end
    if full:
        dom.guest_reboot()  # the guest resets the machine: CMD_INIT again
        dom.wait_firmware()
    dom.destroy()


def check_same_daemon(inst: UnitInstance, pid: int) -> None:
    code, st = inst.home.status(inst.name)
    assert (code, st["pid"]) == (0, pid), st
    assert inst.proc.poll() is None


def test_a_domain_runs_back_to_back_on_an_instance_the_unit_started(
    lv: Libvirt, work: Path
) -> None:
    with home_at(work / "h") as home:
        plain_runs(lv, work, home)


def plain_runs(lv: Libvirt, work: Path, home: Home) -> None:
    home.run("create", "vm", "--no-ek", "--group", QEMU_GROUP)
    inst = unit_start(home, "vm")
    try:
        pid = inst.proc.pid
        tpm_xml = home.run("libvirt", "xml", "vm").stdout
        assert "type='external'" in tpm_xml and "version='2.0'" in tpm_xml
        dom = lv.define("plain", tpm_xml)
        back_to_back(dom, work / "plain.save", home, "vm", full=True)
        check_same_daemon(inst, pid)
        pcrs = pcrs_after_resume(home.registry().paths("vm").ctrl_socket)
        zero = [i for i in FIRMWARE_PCRS if pcrs.get(i, bytes(32)) == bytes(32)]
        assert not zero, f"PCRs {zero} hold nothing of OVMF's\n{lv.describe()}"
        check_same_daemon(inst, pid)
        assert home.run("verify", "vm").returncode == 0
    finally:
        assert inst.stop() == 0
    assert home.status("vm")[0] == 3


def test_an_encrypted_instance_with_keys_from_descriptors_does_the_same(
    lv: Libvirt, work: Path
) -> None:
    """The state key (a passphrase) and the migration key (hex) come on inherited
    descriptors to create and start, as libvirt hands them to swtpm: no key is written
    anywhere. The save files carry the TPM state under the migration key."""
    with home_at(work / "e") as home:
        encrypted_runs(lv, work, home)


PASSPHRASE = b"correct horse battery staple"
MIGRATION_KEY = bytes(range(32)).hex().encode()


def run_with_keys(home: Home, *args: str) -> subprocess.CompletedProcess[str]:
    """vtpmctl ARGS --key pwdfd=N --migration-key fd=M, each key on its own pipe."""
    fds = []
    for data in (PASSPHRASE, MIGRATION_KEY):
        r, w = os.pipe()
        os.write(w, data)
        os.close(w)
        fds.append(r)
    try:
        result = subprocess.run(
            [*VTPMCTL, *args, "--key", f"pwdfd={fds[0]},mode=aes-256-cbc",
             "--migration-key", f"fd={fds[1]},format=hex,mode=aes-256-cbc"],
            env=home.env, capture_output=True, text=True, timeout=120, pass_fds=fds,
            check=False,
        )  # fmt: skip
    finally:
        for fd in fds:
            os.close(fd)
    assert result.returncode == 0, f"vtpmctl {' '.join(args)}: {result.stderr}"
    return result


def encrypted_runs(lv: Libvirt, work: Path, home: Home) -> None:
    run_with_keys(home, "create", "enc", "--no-ek", "--group", QEMU_GROUP)
    run_with_keys(home, "start", "enc")
    assert not [p for p in home.path.rglob("*") if "key" in p.name]
    _, st = home.status("enc")
    pid = st["pid"]
    assert st["encrypted"] is True and st["migration_key"] is True
    dom = lv.define("enc", home.run("libvirt", "xml", "enc").stdout)
    back_to_back(dom, work / "enc.save", home, "enc", full=False)
    code, after = home.status("enc")
    assert (code, after["pid"]) == (0, pid)
    pcrs = pcrs_after_resume(home.registry().paths("enc").ctrl_socket)
    zero = [i for i in FIRMWARE_PCRS if pcrs.get(i, bytes(32)) == bytes(32)]
    assert not zero, f"PCRs {zero} hold nothing of OVMF's\n{lv.describe()}"
    home.run("stop", "enc")
    assert home.status("enc")[0] == 3


def test_stop_ends_the_daemon_while_a_domain_runs(lv: Libvirt, work: Path) -> None:
    """`vtpmctl stop` gets through although QEMU holds the control channel; the state is
    saved, and the next start serves the next run."""
    with home_at(work / "s") as home:
        stop_while_running(lv, home)


def stop_while_running(lv: Libvirt, home: Home) -> None:
    home.run("create", "st", "--no-ek", "--group", QEMU_GROUP)
    home.run("start", "st")
    dom = lv.define("stop", home.run("libvirt", "xml", "st").stdout)
    dom.start()
    t0 = time.monotonic()
    home.run("stop", "st")
    assert time.monotonic() - t0 < 10
    assert home.status("st")[0] == 3
    dom.destroy()
    home.run("start", "st")
    dom.start()
    dom.destroy()
    home.run("stop", "st")
