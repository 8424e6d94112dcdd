"""Live migration between two power-off instances, as `virsh migrate` does it (README, libvirt).

The destination's instance is started the plain way (what its systemd unit does), not
with --incoming: a powered-off TPM takes QEMU's state from the migration stream. Both
daemons outlive their QEMU; the destination then holds the firmware's PCRs, which
only the migration can have brought (SeaBIOS never ran there).
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from instance_helpers import home_at, pcrs_after_resume
from qemu_helpers import QEMU, QemuVm, launch_qemu

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} is not installed"),
]


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vpm-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_plainly_started_power_off_instance_takes_a_live_migration(workdir: Path) -> None:
    key = workdir / "mig.key"
    key.write_bytes(hashlib.sha256(b"live migration key").hexdigest().encode() + b"\n")
    key.chmod(0o600)
    vms: list[QemuVm] = []
    with home_at(workdir / "a") as src, home_at(workdir / "b") as dst:
        try:
            src.run("create", "vm1", "--no-ek", "--on-shutdown", "power-off",
                    "--migration-key-file", str(key))  # fmt: skip
            bundle = workdir / "vm1.bundle"
            src.run("migrate", "export", "vm1", "-o", str(bundle))
            dst.run("migrate", "import", str(bundle), "--migration-key-file", str(key))
            src.run("start", "vm1")
            dst.run("start", "vm1", "--on-shutdown", "power-off")  # as its unit would
            pids = (src.status("vm1")[1]["pid"], dst.status("vm1")[1]["pid"])
            src_ctrl = src.registry().paths("vm1").ctrl_socket
            dst_ctrl = dst.registry().paths("vm1").ctrl_socket

            vm_a = launch_qemu(workdir / "qa", src_ctrl)
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
            vm_b.execute("cont")
            assert vm_b.status() == "running", vm_b.describe()
            assert b"SeaBIOS (version" not in vm_b.firmware_log()
            assert vm_a.quit() == 0, vm_a.describe()
            assert vm_b.quit() == 0, vm_b.describe()
            # Both daemons powered their TPM off and wait for the next VM run.
            assert (src.status("vm1")[1]["pid"], dst.status("vm1")[1]["pid"]) == pids
            log = dst.registry().paths("vm1").log_file.read_text()
            assert " ERROR " not in log and "Traceback" not in log, log
        except BaseException:
            for vm in vms:
                sys.stderr.write(vm.describe() + "\n")
            raise
        finally:
            for vm in vms:
                vm.kill()
        src_pcrs = pcrs_after_resume(src_ctrl)
        dst_pcrs = pcrs_after_resume(dst_ctrl)
        assert dst_pcrs == src_pcrs
        assert all(value != bytes(32) for value in dst_pcrs.values()), dst_pcrs
        src.run("stop", "vm1")
        dst.run("stop", "vm1")
