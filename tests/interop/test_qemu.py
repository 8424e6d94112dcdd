"""Acceptance: QEMU 7.2's ``-tpmdev emulator`` backend runs on our server's control socket.

QEMU gets only ``--ctrl`` and hands the server its data channel with CMD_SET_DATAFD. There
is no guest OS; SeaBIOS is the TPM's client (TPM2_Startup, PCR extends into 0-7).

How the tests see what the firmware did without a guest: when QEMU quits it sends
CMD_SHUTDOWN, and the server first sends TPM2_Shutdown(SU_STATE) (swtpm's auto-shutdown).
A fresh server on the same state dir that starts with TPM2_Startup(SU_STATE) then resumes
the PCRs exactly as the firmware left them, and tpm2-tools reads them. If the firmware had
never started the TPM, that Shutdown fails, the resume fails and so does the PCR read.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu_helpers import QEMU, QemuVm, launch_qemu, parse_pcrread

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} is not installed"),
    pytest.mark.skipif(shutil.which("tpm2_pcrread") is None, reason="tpm2-tools missing"),
]

FIRMWARE_PCRS = range(8)  # SeaBIOS measures into PCRs 0-7
ZERO = bytes(32)
NV_INDEX = "0x1500016"
NV_SIZE = 32

Server = Any  # conftest.VtpmServer
ServerFactory = Callable[..., Server]
VmFactory = Callable[..., QemuVm]


@pytest.fixture
def qemu_vm() -> Iterator[VmFactory]:
    """Factory ``qemu_vm(ctrl_path, device=..., incoming=..., connect=True)``; every VM it
    started is killed and its files removed at the end of the test."""
    started: list[QemuVm] = []

    def start(ctrl_path: Path | str | None, **kwargs: Any) -> QemuVm:
        run_dir = Path(tempfile.mkdtemp(prefix="vq-", dir="/tmp"))
        vm = launch_qemu(run_dir, ctrl_path, **kwargs)
        started.append(vm)
        return vm

    yield start
    for vm in started:
        vm.kill()
        shutil.rmtree(vm.run_dir, ignore_errors=True)


def qemu_server(vtpm_server: ServerFactory, state: Path, **kwargs: Any) -> Server:
    """Our server as QEMU wants it: the control socket only."""
    return vtpm_server(state, data=None, **kwargs)


def boot(vm: QemuVm, server: Server) -> None:
    """``cont`` and wait until the firmware is done with the TPM."""
    assert vm.running, vm.describe()
    vm.execute("cont")
    try:
        vm.wait_firmware()
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- server log ---\n{server.log_text()}") from None
    assert vm.status() == "running", vm.describe()


def quit_and_check(vm: QemuVm, server: Server) -> None:
    """QMP ``quit``: QEMU sends CMD_SHUTDOWN, our server exits 0 and cleans up."""
    assert server.running, f"server died while QEMU ran\n{server.log_text()}"
    assert vm.quit() == 0, vm.describe()
    rc = server.wait_exit(10)
    log = server.log_text()
    print(f"--- server log ({server.state_dir.name}) ---\n{log}")
    assert rc == 0, f"server exit status {rc}\n{log}"
    assert " ERROR " not in log and "Traceback" not in log, log
    assert not server.ctrl.path.exists(), "control socket left behind"
    assert not server.pid_file.exists(), "pid file left behind"


@contextlib.contextmanager
def resumed(vtpm_server: ServerFactory, state: Path) -> Iterator[Server]:
    """A server on ``state`` that resumes with TPM2_Startup(SU_STATE); shut down after."""
    server = vtpm_server(state, flags="startup-state")
    yield server
    assert server.shutdown() == 0


def read_pcrs(server: Server) -> dict[int, bytes]:
    out = server.tpm2("pcrread", "sha256:" + ",".join(map(str, FIRMWARE_PCRS))).stdout
    pcrs = parse_pcrread(out)
    assert sorted(pcrs) == list(FIRMWARE_PCRS), out
    return pcrs


def firmware_pcrs(vtpm_server: ServerFactory, state: Path) -> dict[int, bytes]:
    """PCRs 0-7 as the firmware left them; each must have been extended."""
    with resumed(vtpm_server, state) as server:
        pcrs = read_pcrs(server)
    untouched = [i for i, value in pcrs.items() if value == ZERO]
    assert not untouched, f"the firmware never extended PCRs {untouched}"
    return pcrs


@pytest.mark.parametrize("device", ["tpm-tis", "tpm-crb"])
def test_firmware_starts_and_measures(
    vtpm_server: ServerFactory, qemu_vm: VmFactory, tmp_path: Path, device: str
) -> None:
    state = tmp_path / "state"
    server = qemu_server(vtpm_server, state)
    vm = qemu_vm(server.ctrl.path, device=device)
    assert vm.running, vm.describe()
    (tpm,) = vm.execute("query-tpm")
    assert tpm["model"] == device
    assert tpm["options"]["type"] == "emulator"
    boot(vm, server)
    quit_and_check(vm, server)
    firmware_pcrs(vtpm_server, state)


def test_system_reset(vtpm_server: ServerFactory, qemu_vm: VmFactory, tmp_path: Path) -> None:
    """QEMU repeats CMD_STOP, SET_BUFFERSIZE and CMD_INIT; the firmware starts the TPM again.

    After the reset the PCRs must be those of one single boot (a VM booted once, alongside),
    not the first boot's measurements extended a second time.
    """
    servers = [qemu_server(vtpm_server, tmp_path / name) for name in ("reset", "once")]
    vms = [qemu_vm(server.ctrl.path) for server in servers]
    for vm, server in zip(vms, servers, strict=True):
        boot(vm, server)
    reset_vm = vms[0]
    reset_vm.execute("system_reset")
    reset_vm.wait_firmware(count=2)
    assert reset_vm.status() == "running", reset_vm.describe()
    for vm, server in zip(vms, servers, strict=True):
        quit_and_check(vm, server)
    after_reset = firmware_pcrs(vtpm_server, tmp_path / "reset")
    single_boot = firmware_pcrs(vtpm_server, tmp_path / "once")
    assert after_reset == single_boot


@pytest.mark.parametrize("destination", ["empty", "stale"])
def test_migration(
    vtpm_server: ServerFactory, qemu_vm: VmFactory, tmp_path: Path, destination: str
) -> None:
    """Outgoing ``migrate`` to a file, incoming into a second QEMU on a second server
    started with ``--incoming``: NV (permanent state) and PCRs (volatile state) arrive.

    The destination state dir is new, or holds another TPM's state, which must be replaced.
    """
    src_state, dst_state = tmp_path / "src", tmp_path / "dst"
    marker = secrets.token_bytes(NV_SIZE)

    # The NV index is written before QEMU holds the TPM, through a data socket.
    prep = vtpm_server(src_state, flags="not-need-init,startup-clear")
    prep.tpm2("nvdefine", NV_INDEX, "-C", "o", "-s", str(NV_SIZE), "-a", "ownerread|ownerwrite")
    prep.tpm2("nvwrite", NV_INDEX, "-C", "o", "-i", "-", input=marker)
    assert prep.shutdown() == 0

    src_server = qemu_server(vtpm_server, src_state)
    src = qemu_vm(src_server.ctrl.path)
    boot(src, src_server)
    stream = tmp_path / "vm.migration"
    src.execute("migrate", uri=f"exec:cat > {stream}")
    src.wait_migration()
    assert src.status() == "postmigrate", src.describe()

    if destination == "stale":
        other = vtpm_server(dst_state, flags="not-need-init,startup-clear")
        assert other.shutdown() == 0
    dst_server = qemu_server(vtpm_server, dst_state, extra_args=["--incoming"])
    dst = qemu_vm(dst_server.ctrl.path, incoming="defer")
    assert dst.running, dst.describe()
    dst.execute("migrate-incoming", uri=f"exec:cat {stream}")
    dst.wait_migration()
    dst.execute("cont")
    assert dst.status() == "running", dst.describe()
    # The destination TPM serves the guest: SeaBIOS does not run again, so only the
    # migrated state can make the resume below work.
    assert dst.firmware_log().count(b"SeaBIOS (version") == 0

    quit_and_check(src, src_server)
    quit_and_check(dst, dst_server)

    source_pcrs = firmware_pcrs(vtpm_server, src_state)
    with resumed(vtpm_server, dst_state) as server:
        assert read_pcrs(server) == source_pcrs
        nv = server.tpm2("nvread", NV_INDEX, "-C", "o", "-s", str(NV_SIZE)).stdout
    assert nv == marker


def test_tpm12_starts_and_quits(
    vtpm_server: ServerFactory, qemu_vm: VmFactory, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    server = qemu_server(vtpm_server, state, tpm2=False)
    vm = qemu_vm(server.ctrl.path)
    boot(vm, server)
    quit_and_check(vm, server)
    # QEMU's CMD_INIT at machine reset created the TPM 1.2.
    assert (state / "tpm-00.permall").is_file()
    assert not (state / "tpm2-00.permall").exists()


def test_qemu_refuses_to_start_without_server(qemu_vm: VmFactory, tmp_path: Path) -> None:
    """Harness sanity: with nobody on the control socket QEMU exits with an error."""
    missing = tmp_path / "nobody.ctrl"
    vm = qemu_vm(missing, connect=False)
    assert vm.wait_exit(15) != 0
    assert str(missing) in vm.stderr_path.read_text(errors="replace"), vm.describe()
