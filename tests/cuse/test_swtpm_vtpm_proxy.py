"""``swtpm chardev --vtpm-proxy``: the kernel's /dev/tpmN served by vtpmctl's swtpm program.

The guest kernel (tests/cuse/run.sh) has tpm_vtpm_proxy as a module. The real swtpm 0.7.1
makes a device first, for the shape of the line it prints; then vtpmctl's program makes
one, and tpm2-tools talk to the kernel's driver, which passes each command through the
proxy to vtpmctl.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cuselib import Served, _wait_until, is_chardev, needs_cuse, run

pytestmark = needs_cuse

VTPMX = "/dev/vtpmx"
# what swtpm 0.7.1 prints on stdout once the kernel made the device
NEW_DEVICE = re.compile(r"New TPM device: /dev/tpm(\d+) \(major/minor = (\d+)/(\d+)\)\n")


@pytest.fixture(scope="module")
def vtpmx() -> str:
    if not os.path.exists(VTPMX):
        res = subprocess.run(["modprobe", "tpm_vtpm_proxy"], capture_output=True, text=True)
        if res.returncode != 0 or not os.path.exists(VTPMX):
            pytest.skip(f"no {VTPMX}: modprobe tpm_vtpm_proxy failed: {res.stderr.strip()}")
    return VTPMX


def _start(argv: list[str], state: Path) -> tuple[subprocess.Popen[str], re.Match[str]]:
    """Start a --vtpm-proxy swtpm; its process and its "New TPM device" line."""
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()
    found = NEW_DEVICE.fullmatch(line)
    if found is None:
        proc.kill()
        raise AssertionError(f"{argv[0]}: {line!r}, exit {proc.wait()}: {proc.stderr.read()}")
    return proc, found


def _check_numbers(found: re.Match[str]) -> str:
    """The numbers printed are the device node's."""
    device = f"/dev/tpm{found.group(1)}"
    deadline = time.monotonic() + 120
    while not is_chardev(device):
        assert time.monotonic() < deadline, f"{device} never appeared"
        time.sleep(0.05)
    rdev = os.stat(device).st_rdev
    assert (os.major(rdev), os.minor(rdev)) == (int(found.group(2)), int(found.group(3)))
    return device


def test_vtpm_proxy_device_served_by_vtpmctl(vtpmx: str, guest_tmp: Path) -> None:
    # the real swtpm first: the shape of its line is the contract
    real_state = guest_tmp / "proxy-real"
    real_state.mkdir()
    real, found = _start(
        ["swtpm", "chardev", "--vtpm-proxy", "--tpm2", "--tpmstate", f"dir={real_state}"],
        real_state,
    )
    try:
        _check_numbers(found)
    finally:
        real.terminate()
        real.wait(120)
    # then vtpmctl's program, as the command line
    state = guest_tmp / "proxy-state"
    state.mkdir()
    ctrl = guest_tmp / "proxy.ctrl"
    log = guest_tmp / "proxy.log"
    argv = [
        sys.executable, "-m", "vtpmctl.compat", "swtpm", "chardev", "--vtpm-proxy",
        "--tpmstate", f"dir={state}", "--tpm2", "--ctrl", f"type=unixio,path={ctrl}",
        "--log", f"file={log},level=2",
    ]  # fmt: skip
    proc, found = _start(argv, state)
    served = Served(argv, state, log, proc, ctrl=str(ctrl))  # type: ignore[arg-type]
    try:
        device = _check_numbers(found)
        _wait_until(lambda: os.path.exists(ctrl), served, "swtpm chardev --vtpm-proxy")
        env = dict(os.environ, TPM2TOOLS_TCTI=f"device:{device}")
        out = run(["tpm2_getrandom", "--hex", "16"], env=env).stdout.strip()
        assert len(bytes.fromhex(out)) == 16
        pcrs = run(["tpm2_pcrread", "sha256:0"], env=env).stdout
        assert "0 : 0x" in pcrs, pcrs
        served.swtpm_ioctl("-s")
        assert served.wait_exit() == 0, served.log_text()[-3000:]
        # the kernel removes the device once its proxy end is closed
        deadline = time.monotonic() + 120
        while os.path.exists(device):
            assert time.monotonic() < deadline, f"{device} still exists"
            time.sleep(0.05)
    finally:
        served.stop()
    out = run(["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}", "--print-states"])
    assert '"permall"' in out.stdout
