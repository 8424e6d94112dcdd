"""The engine drops libtpms' getlocality callback at locality 0 (a Python call
per command saved) and must still run every command at the locality set.

libtpms holds one TPM per process, so the checks run in a child process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from vtpmctl.device.protocol import Cmd
    from vtpmctl.engine.tpm import Engine, EngineConfig
    from vtpmctl.store.statedir import StateDir

    tpm2 = sys.argv[2] == "2"
    sd = StateDir(Path(sys.argv[1]), tpm2=tpm2, key=None)
    sd.ensure()
    e = Engine(sd, EngineConfig(tpm2=tpm2, not_need_init=True))
    e.start()

    def rc(resp):
        return int.from_bytes(resp[6:10], "big")

    def loc(n):
        assert e.control(Cmd.SET_LOCALITY, {"loc": n}).result == 0

    if tpm2:
        startup = bytes.fromhex("80010000000c000001440000")
        getrandom = bytes.fromhex("80010000000c0000017b0010")
        assert e.tpm._locality_cb is False
        loc(1)
        assert e.tpm._locality_cb is True
        assert rc(e.process(startup)) == 0x907  # TPM2_Startup refused at locality 1
        loc(0)
        assert e.tpm._locality_cb is False
        assert rc(e.process(startup)) == 0
        e.set_locality_raw(3)
        assert e.tpm._locality_cb is True and rc(e.process(getrandom)) == 0
        e.set_locality_raw(0)
        assert e.tpm._locality_cb is False and rc(e.process(getrandom)) == 0
        # RESET_TPMESTABLISHED takes its own locality and restores ours after.
        assert e.control(Cmd.RESET_TPMESTABLISHED, {"loc": 0}).result == 0x3D
        assert e.control(Cmd.RESET_TPMESTABLISHED, {"loc": 3}).result == 0
        assert e.tpm._locality_cb is False and rc(e.process(getrandom)) == 0
    else:
        assert e.tpm._locality_cb is True
        loc(0)
        assert e.tpm._locality_cb is True  # TPM 1.2 keeps the callback
    e.close()
    print("ok")
""")


@pytest.mark.parametrize("family", ["2", "1.2"])
def test_locality_reaches_libtpms(family: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), family],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
