"""Acceptance: QEMU 7.2 live-migrates a running guest between two vtpmctl stores.

Two stores (two "hosts"). The source instance ``vm1`` is copied to the destination
store first with a migration bundle (how its keys, EK data and config get there), then
its TPM changes further (a second NV index) and QEMU A runs the guest on it: SeaBIOS
starts the TPM and extends PCRs 0-7. The destination is started with ``vtpmctl start
vm1 --incoming``; QEMU B waits with ``-incoming`` and QMP ``migrate`` moves the guest
over a unix socket. After ``cont`` on B, only the live migration can have brought the
second NV index and the firmware's PCRs: both are checked on the destination after
QEMU B quits, by restarting its instance and resuming with TPM2_Startup(STATE).

The source TPM is served to QEMU A by ``vtpmctl serve`` on the instance's state dir
(QEMU brings its own data channel, which an instance started with a data socket would
refuse, as swtpm does).
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from instance_helpers import VTPMCTL, DataClient, Home, home_at, nv_define, nv_read, nv_write_cmd
from instance_helpers import rc as tpm_rc
from qemu_helpers import QEMU, QemuVm, launch_qemu

from vtpmctl.engine import tpm2 as t

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} is not installed"),
]

NV_COLD, NV_LIVE = 0x01500016, 0x01500017
COLD = b"copied-by-the-bundle-0123456789!"
LIVE = b"only-live-migration-brings-this!"
EK_HANDLES = (0x81010001, 0x81010016)
FIRMWARE_PCRS = list(range(8))


def boot(home: Home, name: str) -> DataClient:
    """Start NAME, CMD_INIT, and return a data connection (no Startup yet)."""
    home.run("start", name)
    home.run("ctl", name, "init")
    return DataClient(home.registry().paths(name).data_socket)


def write_nv(home: Home, name: str, index: int, value: bytes) -> None:
    with boot(home, name) as client:
        t.startup(client.transact)
        nv_define(client.transact, index, size=len(value))
        assert tpm_rc(client.transact(nv_write_cmd(value, index))) == 0
    home.run("stop", name)


def resume_and_read(
    home: Home, name: str
) -> tuple[dict[int, bytes], dict[int, bytes], list[bytes]]:
    """TPM2_Startup(STATE) after QEMU's auto-shutdown: PCRs, EK Names, both NV indexes."""
    with boot(home, name) as client:
        t.startup(client.transact, t.SU_STATE)
        pcrs = t.pcr_read(client.transact, {t.Alg.SHA256: FIRMWARE_PCRS})[t.Alg.SHA256]
        names = {h: t.read_public(client.transact, h).name for h in EK_HANDLES}
        nv = [nv_read(client.transact, len(COLD), NV_COLD)]
        with contextlib.suppress(t.TpmError):
            nv.append(nv_read(client.transact, len(LIVE), NV_LIVE))
    home.run("stop", name)
    return pcrs, names, nv


@contextlib.contextmanager
def serve_for_qemu(home: Home, name: str, ctrl: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``vtpmctl serve`` on a registered instance's state, control socket only."""
    paths = home.registry().paths(name)
    argv = [
        *VTPMCTL,
        "serve",
        "--state",
        str(paths.state_dir),
        "--ctrl",
        f"unix:{ctrl}",
        "--existing",
        "--log-file",
        str(ctrl.parent / "serve.log"),
    ]
    if paths.migration_key.exists():
        argv += ["--migration-key-file", str(paths.migration_key)]
    proc = subprocess.Popen(argv, env=home.env, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not ctrl.exists():
            assert proc.poll() is None, "vtpmctl serve exited at start"
            assert time.monotonic() < deadline, "vtpmctl serve did not come up"
            time.sleep(0.02)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vlm-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_live_migration_between_stores(workdir: Path) -> None:
    vms: list[QemuVm] = []
    key = workdir / "mig.key"
    key.write_bytes(hashlib.sha256(b"live migration key").hexdigest().encode() + b"\n")
    key.chmod(0o600)
    with home_at(workdir / "a") as src, home_at(workdir / "b") as dst:
        try:
            src.run("create", "vm1", "--migration-key-file", str(key))
            write_nv(src, "vm1", NV_COLD, COLD)
            # The destination gets the instance (keys, EK data, config) from a bundle.
            bundle = workdir / "vm1.bundle"
            src.run("migrate", "export", "vm1", "-o", str(bundle))
            dst.run("migrate", "import", str(bundle), "--migration-key-file", str(key))
            write_nv(src, "vm1", NV_LIVE, LIVE)  # after the copy: only QEMU can bring it

            dst.run("start", "vm1", "--incoming")
            dst_ctrl = dst.registry().paths("vm1").ctrl_socket
            with serve_for_qemu(src, "vm1", workdir / "src.ctrl") as server:
                vm_a = launch_qemu(workdir / "qa", workdir / "src.ctrl")
                vms.append(vm_a)
                assert vm_a.running, vm_a.describe()
                vm_a.execute("cont")
                vm_a.wait_firmware(timeout=60)

                vm_b = launch_qemu(workdir / "qb", dst_ctrl, incoming="defer")
                vms.append(vm_b)
                assert vm_b.running, vm_b.describe()
                uri = f"unix:{workdir / 'migrate.sock'}"
                vm_b.execute("migrate-incoming", uri=uri)
                vm_a.execute("migrate", uri=uri)
                vm_a.wait_migration(timeout=120)
                vm_b.wait_migration(timeout=60)
                assert vm_a.status() == "postmigrate", vm_a.describe()
                vm_b.execute("cont")
                assert vm_b.status() == "running", vm_b.describe()
                # SeaBIOS never ran on B: its TPM state came with the guest.
                assert b"SeaBIOS (version" not in vm_b.firmware_log()

                assert vm_a.quit() == 0, vm_a.describe()
                assert server.wait(15) == 0  # QEMU's CMD_SHUTDOWN ends it
            assert vm_b.quit() == 0, vm_b.describe()
            code, st = dst.status("vm1")
            assert code == 3, st  # QEMU's CMD_SHUTDOWN ended the destination daemon too
            log = dst.registry().paths("vm1").log_file.read_text()
            assert " ERROR " not in log and "Traceback" not in log, log
        except BaseException:
            for vm in vms:
                sys.stderr.write(vm.describe() + "\n")
            raise
        finally:
            for vm in vms:
                vm.kill()

        src_pcrs, src_names, src_nv = resume_and_read(src, "vm1")
        dst_pcrs, dst_names, dst_nv = resume_and_read(dst, "vm1")
    assert src_nv == [COLD, LIVE]
    assert dst_nv == [COLD, LIVE]
    assert dst_names == src_names
    assert dst_pcrs == src_pcrs
    assert all(value != bytes(32) for value in dst_pcrs.values()), dst_pcrs
