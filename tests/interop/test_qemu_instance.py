"""A named instance serves QEMU: `start --ctrl-only`, firmware boots, `quit` stops it.

QEMU's `-tpmdev emulator` passes its own data channel (CMD_SET_DATAFD), which a server
refuses while it has a data listener (as swtpm does); `--ctrl-only` is the instance form
of what libvirt runs.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest
from instance_helpers import home_at
from qemu_helpers import QEMU, launch_qemu

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} is not installed"),
]


def test_instance_serves_qemu(tmp_path: Path) -> None:
    with home_at(tmp_path / "home") as home:
        home.run("create", "vm1", "--no-ek")
        home.run("start", "vm1", "--ctrl-only")
        code, st = home.status("vm1")
        assert code == 0 and st["state"] == "running"
        assert st["endpoints"]["data"] is None  # QEMU brings the data channel
        ctrl = st["endpoints"]["ctrl"].removeprefix("unix:")
        run_dir = Path(tempfile.mkdtemp(prefix="vqi-", dir="/tmp"))
        vm = launch_qemu(run_dir, ctrl)
        try:
            vm.execute("cont")
            vm.wait_firmware()
            assert vm.quit() == 0
        finally:
            vm.kill()
            shutil.rmtree(run_dir, ignore_errors=True)
        # QEMU's CMD_SHUTDOWN at exit ends the daemon: the instance is stopped, not stale.
        deadline = time.monotonic() + 10
        while home.status("vm1")[0] != 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        code, st = home.status("vm1")
        assert code == 3, st
        # The firmware's TPM2_Startup and measurements were stored: it starts again.
        home.run("start", "vm1")
        home.run("ctl", "vm1", "init")
        home.tpm2("vm1", "startup")  # TPM2_Startup(SU_STATE) resumes what the firmware left
        assert home.tpm2("vm1", "getrandom", "8").returncode == 0
        home.run("stop", "vm1")
