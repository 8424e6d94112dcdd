"""``swtpm cuse`` from vtpmctl's swtpm-compatible program: /dev/NAME as swtpm names it.

swtpm_ioctl and tpm2-tools use the device; the real swtpm then reads the state it left.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cuselib import Served, _wait_until, is_chardev, needs_cuse, run

pytestmark = needs_cuse

NAME = "vtpm-compat0"  # swtpm cuse -n NAME makes /dev/NAME (no vtpm- added)


def test_swtpm_cuse_program(guest_tmp: Path) -> None:
    state = guest_tmp / "compat-state"
    state.mkdir()
    log = guest_tmp / "compat.log"
    device = f"/dev/{NAME}"
    argv = [
        sys.executable, "-m", "vtpmctl.compat", "swtpm", "cuse", "-n", NAME, "--tpm2",
        "--tpmstate", f"dir={state}", "--flags", "not-need-init,startup-clear",
        "--log", f"file={log},level=2",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    served = Served(argv, state, log, proc, device=device)
    try:
        _wait_until(lambda: is_chardev(device), served, "swtpm cuse")
        assert served.swtpm_ioctl("-c").stdout.strip().startswith("ptm capability is 0x")
        assert len(bytes.fromhex(served.tpm2("getrandom", "8", "--hex").stdout.strip())) == 8
        served.swtpm_ioctl("-s")
        assert served.wait_exit() == 0
    finally:
        served.stop()
    out = run(["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}", "--print-states"])
    names = [s["name"] for s in json.loads(out.stdout)["states"]]
    assert "permall" in names
