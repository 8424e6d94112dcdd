"""Store modes do not come from the umask; run dirs of other users are refused."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from instance_helpers import VTPMCTL, Home, home_at

NOBODY = 65534


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    with home_at(tmp_path / "h") as h:
        yield h


def run_umask_000(home: Home, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VTPMCTL, *args],
        env=home.env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        preexec_fn=lambda: os.umask(0),
    )


def test_umask_000_leaves_nothing_writable_by_others(home: Home) -> None:
    for args in (
        ("create", "m", "--encrypt"),
        ("start", "m"),
        ("snapshot", "create", "m"),
        ("stop", "m"),
        ("snapshot", "create", "m"),
    ):
        result = run_umask_000(home, *args)
        assert result.returncode == 0, (args, result.stderr)
    roots = home.registry().roots
    assert stat.S_IMODE(roots.config.stat().st_mode) == 0o700
    for root in (roots.state, roots.runtime, roots.logs):
        assert stat.S_IMODE(root.stat().st_mode) == 0o755, root
    loose = []
    for directory, dirs, files in os.walk(home.path):
        for name in [*dirs, *files]:
            path = Path(directory) / name
            if stat.S_IMODE(path.lstat().st_mode) & 0o022 and not path.is_symlink():
                loose.append(f"{path} {stat.S_IMODE(path.lstat().st_mode):04o}")
    assert not loose, loose


def one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert result.stderr.count("\n") == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def test_start_refuses_a_run_dir_another_user_made(home: Home) -> None:
    home.run("create", "m", "--no-ek")
    run_dir = home.registry().paths("m").run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    os.chown(run_dir, NOBODY, NOBODY)
    one_line_error(home.run("start", "m", check=False), str(run_dir), f"uid {NOBODY}", "chown")
    assert home.status("m")[0] == 3
    assert run_dir.stat().st_uid == NOBODY and not any(run_dir.iterdir())
    os.chown(run_dir, 0, 0)
    run_dir.chmod(0o777)
    one_line_error(home.run("start", "m", check=False), "writable by group or others")
    run_dir.chmod(0o700)
    config_root = home.registry().roots.config
    os.chown(config_root, NOBODY, NOBODY)  # keys another user could swap
    one_line_error(home.run("start", "m", check=False), str(config_root), "chown")
    os.chown(config_root, 0, 0)
    home.run("start", "m")
    home.run("stop", "m")


def test_verify_checks_the_roots(home: Home) -> None:
    home.run("create", "m", "--no-ek")
    roots = home.registry().roots
    roots.state.chmod(0o777)
    os.chown(roots.logs, NOBODY, NOBODY)
    result = home.run("verify", "m", "--json", check=False)
    assert result.returncode == 1
    found = {f["path"]: f for f in json.loads(result.stdout)["findings"]}
    assert found[str(roots.state)]["level"] == "error"
    assert found[str(roots.logs)]["level"] == "error"
    assert "chown" in found[str(roots.logs)]["fix"]
    roots.state.chmod(0o755)
    os.chown(roots.logs, 0, 0)
    assert home.run("verify", "m", check=False).returncode == 0


def without_dac_override(home: Home, *args: str) -> subprocess.CompletedProcess[str]:
    """vtpmctl as root without CAP_DAC_OVERRIDE: another user's 0700 dir is unreadable."""
    return subprocess.run(
        ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *VTPMCTL, *args],
        env=home.env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_an_unreadable_instance_is_listed_and_named_not_missing(home: Home) -> None:
    home.run("create", "a", "--no-ek")
    home.run("create", "b", "--no-ek")
    base = home.registry().paths("a").base
    for directory, _, files in os.walk(base):
        os.chown(directory, NOBODY, NOBODY)
        for name in files:
            os.chown(os.path.join(directory, name), NOBODY, NOBODY)
    listed = without_dac_override(home, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    records = {r["name"]: r for r in json.loads(listed.stdout)["instances"]}
    assert records["b"]["state"] == "stopped"
    assert records["a"]["state"] == "unknown" and "permission denied" in records["a"]["error"]
    text = without_dac_override(home, "list")
    assert text.returncode == 0 and "a" in text.stdout and "b" in text.stdout
    status = without_dac_override(home, "status", "a")
    one_line_error(status, "permission denied", f"uid {NOBODY}")
    assert "no instance" not in status.stderr and "backup" not in status.stderr
    assert without_dac_override(home, "status", "b").returncode == 3


def test_start_refuses_a_state_dir_an_uninitialised_swtpm_serves(home: Home) -> None:
    """swtpm 0.7.1 takes .lock only at CMD_INIT: the lock alone cannot show it."""
    from swtpm_peer import swtpm_socket

    home.run("create", "m", "--no-ek")
    state_dir = home.registry().paths("m").state_dir
    with swtpm_socket(state_dir, flags=None) as peer:
        result = home.run("start", "m", check=False)
        one_line_error(result, "swtpm", str(peer.proc.pid), "stop that process")
        assert home.status("m")[0] == 3
    home.run("start", "m")
    home.run("stop", "m")
