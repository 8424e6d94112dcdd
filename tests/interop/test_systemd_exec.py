"""systemd/vtpmctl@.service works as shipped after the README's set-up.

systemd is not run here: the test does what it would do for ``systemctl
start vtpmctl@NAME``: the unit's ExecStart with %i substituted, resolved in
systemd's own search path (not the caller's PATH), with the unit's UMask and
the directories and variables its *Directory= settings give, and
$NOTIFY_SOCKET for Type=notify. The instance must announce READY=1 and
answer, and SIGTERM (systemctl stop) must end it cleanly.
"""

from __future__ import annotations

import configparser
import json
import os
import shlex
import signal
import socket
import subprocess
from pathlib import Path

from instance_helpers import VTPMCTL

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "vtpmctl@.service"
# Where systemd looks for a command named without a path (systemd.service(5)).
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NAME = "unit1"


def service() -> configparser.SectionProxy:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(UNIT)
    return unit["Service"]


def resolve(command: str) -> str | None:
    if os.path.isabs(command):
        return command if os.access(command, os.X_OK) else None
    for d in SYSTEMD_PATH.split(":"):
        candidate = os.path.join(d, command)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def test_the_units_exec_start_brings_the_instance_up(tmp_path: Path) -> None:
    svc = service()
    argv = [arg.replace("%i", NAME) for arg in shlex.split(svc["ExecStart"])]
    exe = resolve(argv[0])
    assert exe is not None, f"{argv[0]} is not where systemd looks; run scripts/setup"
    dirs = {
        "CONFIGURATION_DIRECTORY": (tmp_path / "etc", svc["ConfigurationDirectoryMode"]),
        "STATE_DIRECTORY": (tmp_path / "lib", svc["StateDirectoryMode"]),
        "RUNTIME_DIRECTORY": (tmp_path / "run", svc["RuntimeDirectoryMode"]),
        "LOGS_DIRECTORY": (tmp_path / "log", svc.get("LogsDirectoryMode", "0755")),
    }
    env = {"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8"}
    if "PYTHONPATH" in os.environ:  # the checkout under test, not another install
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    for var, (path, mode) in dirs.items():
        path.mkdir(mode=int(mode, 8))
        env[var] = str(path)
    umask = int(svc["UMask"], 8)
    create = subprocess.run(
        [*VTPMCTL, "create", NAME, "--no-ek"], env=env, capture_output=True, text=True
    )
    assert create.returncode == 0, create.stderr

    notify_path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(30)
        proc = subprocess.Popen(
            [exe, *argv[1:]],
            env=dict(env, NOTIFY_SOCKET=str(notify_path)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=lambda: os.umask(umask),
        )
        try:
            messages = b""
            while b"READY=1" not in messages:
                try:
                    messages += notify.recv(4096) + b"\n"
                except TimeoutError:
                    proc.kill()
                    out, err = proc.communicate()
                    raise AssertionError(f"no READY=1: {err.decode()}") from None
            status = subprocess.run(
                [*VTPMCTL, "status", NAME, "--json"], env=env, capture_output=True, text=True
            )
            assert status.returncode == 0, status.stderr
            assert json.loads(status.stdout)["pid"] == proc.pid
            caps = subprocess.run([*VTPMCTL, "caps", NAME], env=env, capture_output=True)
            assert caps.returncode == 0, caps.stderr
        finally:
            proc.send_signal(signal.SIGTERM)  # systemctl stop
            rc = proc.wait(float(svc["TimeoutStopSec"].rstrip("s")))
    assert rc == 0, proc.stderr.read() if proc.stderr else ""
