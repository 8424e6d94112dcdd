"""--group/--socket-mode/--dir-mode: exactly what was asked, never wider, whatever the umask.

Also what the options mean for an instance's life: one made with --group is for a
hypervisor, so CMD_SHUTDOWN powers its TPM off and the daemon keeps serving; the
next client's CMD_INIT powers it on, and `vtpmctl stop` still ends it.
"""

from __future__ import annotations

import grp
import json
import os
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from instance_helpers import VTPMCTL, Home, home_at

from vtpmctl.device.client.target import open_client

GROUP = "libvirt-qemu" if any(g.gr_name == "libvirt-qemu" for g in grp.getgrall()) else "nogroup"
GID = grp.getgrnam(GROUP).gr_gid


@pytest.fixture
def home() -> Iterator[Home]:
    # Under /tmp with a short path: the sockets' paths must fit in 108 bytes.
    base = Path(tempfile.mkdtemp(prefix="va-", dir="/tmp"))
    with home_at(base / "h") as h:
        yield h
    subprocess.run(["rm", "-rf", str(base)], check=False)


def under_umask(home: Home, umask: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VTPMCTL, *args],
        env=home.env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        preexec_fn=lambda: os.umask(umask),
        check=False,
    )


def mode_and_gid(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return stat.S_IMODE(st.st_mode), st.st_gid


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_sockets_and_run_dir_get_exactly_the_asked_modes(home: Home, umask: int) -> None:
    created = under_umask(home, umask, "create", "m", "--no-ek", "--group", GROUP)
    assert created.returncode == 0, created.stderr
    paths = home.registry().paths("m")
    started = under_umask(home, umask, "start", "m")
    assert started.returncode == 0, started.stderr
    assert mode_and_gid(paths.run_dir) == (0o710, GID)
    assert mode_and_gid(paths.ctrl_socket) == (0o660, GID)
    assert not paths.data_socket.exists()  # for a hypervisor: QEMU brings its data channel
    assert home.run("verify", "m").returncode == 0
    home.run("stop", "m")

    # Narrower on the next start, and saved: a plain start (the unit's) keeps it.
    narrowed = under_umask(home, umask, "start", "m", "--socket-mode", "0600", "--dir-mode", "700")
    assert narrowed.returncode == 0, narrowed.stderr
    assert mode_and_gid(paths.run_dir) == (0o700, GID)
    assert mode_and_gid(paths.ctrl_socket) == (0o600, GID)
    home.run("stop", "m")
    assert under_umask(home, umask, "start", "m").returncode == 0
    assert mode_and_gid(paths.ctrl_socket) == (0o600, GID)
    config = json.loads(paths.config_file.read_text())
    assert config["group"] == GROUP  # the private modes are the defaults: not written
    assert "socket_mode" not in config and "dir_mode" not in config
    home.run("stop", "m")


def test_serve_gives_its_sockets_the_asked_mode_and_group(tmp_path: Path) -> None:
    run = Path(tempfile.mkdtemp(prefix="vs-", dir="/tmp"))
    try:
        proc = subprocess.Popen(
            [*VTPMCTL, "serve", "--state", str(tmp_path / "st"), "--ctrl", f"unix:{run}/c",
             "--data", f"unix:{run}/d", "--group", GROUP, "--socket-mode", "0640"],
            preexec_fn=lambda: os.umask(0),
            stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 20
            while not (run / "d").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            with open_client(f"unix:{run}/c", timeout=10) as client:
                assert client.caps()
            for path in (run / "c", run / "d"):
                assert mode_and_gid(path) == (0o640, GID)
        finally:
            proc.terminate()
            proc.wait(10)
    finally:
        subprocess.run(["rm", "-rf", str(run)], check=False)


@pytest.mark.parametrize(
    ("option", "needle"),
    [
        (("--dir-mode", "0730"), "lets others write"),
        (("--dir-mode", "0510"), "locks out the owner"),
        (("--socket-mode", "0460"), "locks out the owner"),
        (("--socket-mode", "rw"), "not an octal mode"),
        (("--group", "no-such-group-here"), "no group named"),
    ],
)
def test_bad_access_options_are_one_line_usage_errors(
    home: Home, option: tuple[str, str], needle: str
) -> None:
    result = home.run("create", "m", "--no-ek", *option, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and needle in result.stderr, result.stderr
    assert home.run("list", "--quiet").stdout == ""


def test_verify_names_a_socket_wider_than_configured(home: Home) -> None:
    home.run("create", "m", "--no-ek", "--group", GROUP)
    home.run("start", "m")
    paths = home.registry().paths("m")
    os.chmod(paths.ctrl_socket, 0o666)
    result = home.run("verify", "m", "--json", check=False)
    assert result.returncode == 1
    found = {f["check"]: f for f in json.loads(result.stdout)["findings"]}
    assert found["access.ctrl"]["level"] == "error"
    assert "wider than the configured 0660" in found["access.ctrl"]["what"]
    assert found["access.ctrl"]["fix"].startswith(f"chmod 0660 {paths.ctrl_socket}")
    home.run("stop", "m")


def test_a_power_off_instance_serves_one_client_after_another(home: Home) -> None:
    """CMD_SHUTDOWN powers the TPM off and keeps the endpoint; stop ends the daemon."""
    home.run("create", "m", "--no-ek", "--group", GROUP)
    assert "on shutdown  power-off" in home.run("status", "m", check=False).stdout
    home.run("start", "m")
    _, st = home.status("m")
    pid = st["pid"]
    ctrl = st["endpoints"]["ctrl"]
    for _ in range(3):  # three VM runs
        with open_client(ctrl, timeout=10) as client:
            client.init()
            client.shutdown()
        with open_client(ctrl, timeout=10) as client:
            assert client.caps()  # still served, by the same process
        assert home.status("m") == (0, st)
    assert home.run("stop", "m").stdout.strip() == f"stopped m (pid {pid})"
    assert home.status("m")[0] == 3


def test_without_a_group_shutdown_still_ends_the_daemon(home: Home) -> None:
    home.run("create", "m", "--no-ek")
    home.run("start", "m")
    with open_client(home.status("m")[1]["endpoints"]["ctrl"], timeout=10) as client:
        client.init()
        client.shutdown()
    home.run("stop", "m")  # waits for the exit if it is still under way
    assert home.status("m")[0] == 3
    result = home.run("libvirt", "xml", "m")
    assert "--group libvirt-qemu --on-shutdown power-off" in result.stderr
