"""A named instance with --transport cuse: /dev/vtpm-NAME from create to rm.

Python is very slow in the CUSE VM, so only what needs the command line
(name resolution, status --json) goes through it; the rest is in-process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cuselib import START_TIMEOUT, TOOL_TIMEOUT, VTPMCTL, is_chardev, needs_cuse, run

from vtpmctl.store.instances import Registry
from vtpmctl.store.paths import store_roots
from vtpmctl.usecases import supervisor
from vtpmctl.usecases.create import CreateOptions, create_instance

pytestmark = needs_cuse


def test_cuse_instance_lifecycle(guest_tmp: Path) -> None:
    env = dict(os.environ, VTPMCTL_HOME=str(guest_tmp / "h"))
    env.pop("NOTIFY_SOCKET", None)
    name = "cuse-inst"
    registry = Registry(store_roots(env))
    inst = create_instance(registry, name, CreateOptions(transport="cuse", ek=False))
    started = supervisor.start(inst, timeout=START_TIMEOUT)
    try:
        st = json.loads(run([VTPMCTL, "status", name, "--json"], env=env).stdout)
        assert st["state"] == "running" and st["pid"] == started.pid
        assert st["transport"] == "cuse"
        assert st["endpoints"] == {"ctrl": None, "data": None, "device": f"/dev/vtpm-{name}"}
        assert is_chardev(st["endpoints"]["device"])
        run([VTPMCTL, "ctl", name, "init"], env=env)  # the name resolves to the device
        tcti = dict(os.environ, TPM2TOOLS_TCTI=f"device:/dev/vtpm-{name}")
        run(["tpm2_startup", "-c"], env=tcti)
        assert len(run(["tpm2_getrandom", "--hex", "8"], env=tcti).stdout.strip()) == 16
        assert supervisor.stop(inst, timeout=TOOL_TIMEOUT) == started.pid
    finally:
        if supervisor.probe(inst).state == "running":
            os.kill(started.pid, 9)
    assert supervisor.probe(inst).state == "stopped"
    assert not os.path.exists(f"/dev/vtpm-{name}")
    registry.remove(name)
