"""The fast route of the query and lifecycle commands loads none of typer, rich,
cryptography, and never the engine: each costs more than the command itself
(docs/architecture.md, "How a command flows")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vtpmctl.store import instance_keys
from vtpmctl.store.blob import AesKey, wrap_file
from vtpmctl.store.instances import InstanceConfig, InstanceMeta, Registry
from vtpmctl.store.keys import key_fingerprint

# Top-level packages the fast route must not import, and the engine (libtpms).
HEAVY = ("typer", "click", "rich", "cryptography", "boto3", "botocore")
ENGINE = "vtpmctl.engine"
MAIN = "import sys; from vtpmctl.cli import main; sys.exit(main())"
NOWHERE = "unix:/nonexistent/vtpmctl-budget.ctrl"
# The command run by the console script itself, as when no command server runs
# (tests/interop/test_command_server.py checks the served side's imports).
IN_PROCESS = {"VTPMCTL_COMMAND_SERVER": "0"}


def imported(stderr: str) -> list[str]:
    """Module names from `python -X importtime` output, in the order it reports them."""
    names = []
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                names.append(name)
    return names


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with one plain and one encrypted stopped instance (files written directly)."""
    root = tmp_path_factory.mktemp("budget")
    old = os.environ.get("VTPMCTL_HOME")
    os.environ["VTPMCTL_HOME"] = str(root)
    try:
        registry = Registry()
        for name, key in (("plain", None), ("sealed", AesKey(bytes(range(32))))):
            with registry.reserve(name) as paths:
                registry.ensure_dirs(paths)
                paths.state_dir.mkdir(mode=0o700)
                (paths.state_dir / "tpm2-00.permall").write_bytes(wrap_file(b"P" * 64, key))
                meta = InstanceMeta(vtpmctl_version="test")
                if key is not None:
                    instance_keys.store_key(paths.state_key, key)
                    meta.key_fingerprint = key_fingerprint(key)
                    meta.cipher = key.cipher
                registry.commit(paths, InstanceConfig(name=name, encrypted=key is not None), meta)
    finally:
        if old is None:
            del os.environ["VTPMCTL_HOME"]
        else:
            os.environ["VTPMCTL_HOME"] = old
    return root


@pytest.mark.parametrize(
    "args",
    [
        ["caps", NOWHERE],
        ["info", "--json", NOWHERE],
        ["ctl", NOWHERE, "locality", "3"],
        ["--timeout", "2", "caps", "--json", NOWHERE],
        ["status", "plain"],
        ["status", "--json", "sealed"],
        ["status", "missing"],
        ["list", "--json"],
        ["list", "--quiet"],
        ["stop", "plain"],
    ],
)
def test_fast_route_loads_nothing_heavy(home: Path, args: list[str]) -> None:
    env = {**os.environ, "VTPMCTL_HOME": str(home), **IN_PROCESS}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", MAIN, *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    names = imported(done.stderr)
    assert "vtpmctl.cli" in names, done.stderr[-2000:]
    heavy = [n for n in names if n.split(".")[0] in HEAVY]
    engine = [n for n in names if n == ENGINE or n.startswith(ENGINE + ".")]
    assert not heavy, f"vtpmctl {' '.join(args)} imported {heavy[:5]}"
    assert not engine, f"vtpmctl {' '.join(args)} imported {engine}"
    # The command ran to its end (an answer or a one-line error), not into a traceback.
    assert "Traceback" not in done.stderr


def test_the_typer_route_is_seen(home: Path) -> None:
    """The check above can fail: help goes through typer, and importtime shows it."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", MAIN, "caps", "--help"],
        env={**os.environ, "VTPMCTL_HOME": str(home), **IN_PROCESS},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "typer" in imported(done.stderr)


def test_libtpms_version_comes_from_a_child() -> None:
    """A bundle records libtpms' version; the process that asks never maps the library."""
    code = (
        "import sys\n"
        "from vtpmctl.usecases.migrate import libtpms_version\n"
        "version = libtpms_version()\n"
        "maps = open('/proc/self/maps').read()\n"
        "engine = [m for m in sys.modules if m.startswith('vtpmctl.engine')]\n"
        "print(version, 'libtpms' in maps, engine)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    version, mapped, engine = done.stdout.split(" ", 2)
    assert version.count(".") == 2, done.stdout
    assert mapped == "False"
    assert engine.strip() == "[]"


@pytest.mark.parametrize(
    "args",
    [
        ["snapshot", "create", "plain"],
        ["snapshot", "list", "--json", "plain"],
        ["migrate", "export", "plain", "-o", "{tmp}/plain.bundle"],
        ["verify", "--quiet", "plain"],
        ["state", "export", NOWHERE, "-o", "{tmp}/blob"],
        ["start", "missing"],
    ],
)
def test_state_moves_skip_typer(home: Path, tmp_path: Path, args: list[str]) -> None:
    """The commands scripts run on named vTPMs take the fast route too (no typer, click
    or rich; cryptography only where a key is in use), and libtpms only in a child."""
    env = {**os.environ, "VTPMCTL_HOME": str(home), **IN_PROCESS}
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", MAIN, *argv],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    names = imported(done.stderr)
    heavy = [n for n in names if n.split(".")[0] in ("typer", "click", "rich")]
    engine = [n for n in names if n == ENGINE or n.startswith(ENGINE + ".")]
    assert not heavy, f"vtpmctl {' '.join(args)} imported {heavy[:5]}"
    assert not engine, f"vtpmctl {' '.join(args)} imported {engine}"
    assert "Traceback" not in done.stderr
