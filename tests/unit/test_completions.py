"""completions/ is generated from the command line; stale files fail here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FILES = ("vtpmctl.bash", "_vtpmctl", "vtpmctl.fish")


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("completions")
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen-completions"), "--output", str(out)],
        check=True,
        timeout=60,
    )
    return out


@pytest.mark.parametrize("name", FILES)
def test_completions_are_current(generated: Path, name: str) -> None:
    committed = ROOT / "completions" / name
    assert committed.is_file(), f"{committed} is missing; run scripts/gen-completions"
    assert committed.read_text() == (generated / name).read_text(), (
        f"completions/{name} is stale: the command line changed; run scripts/gen-completions"
    )


@pytest.mark.parametrize(
    ("shell", "name"), [("bash", "vtpmctl.bash"), ("zsh", "_vtpmctl"), ("fish", "vtpmctl.fish")]
)
def test_completion_syntax(generated: Path, shell: str, name: str) -> None:
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed")
    subprocess.run([shell, "-n", str(generated / name)], check=True, timeout=30)


def _bash_complete(generated: Path, home: Path, *words: str) -> list[str]:
    script = f"""
source {generated / "vtpmctl.bash"}
COMP_WORDS=({" ".join(repr(w) for w in words)})
COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1))
_vtpmctl
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    env = dict(
        os.environ,
        VTPMCTL_HOME=str(home),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    )
    out = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, check=True, timeout=30
    ).stdout
    return [line for line in out.splitlines() if line]


def test_bash_completes_commands_options_and_names(generated: Path, tmp_path: Path) -> None:
    from vtpmctl.store.instances import InstanceConfig, InstanceMeta, Registry
    from vtpmctl.store.paths import store_roots

    registry = Registry(store_roots({"VTPMCTL_HOME": str(tmp_path)}))
    for name in ("alpha", "beta"):
        with registry.reserve(name) as paths:
            registry.commit(paths, InstanceConfig(name=name), InstanceMeta())
    assert _bash_complete(generated, tmp_path, "vtpmctl", "sto") == ["stop"]
    assert _bash_complete(generated, tmp_path, "vtpmctl", "start", "") == ["alpha", "beta"]
    assert _bash_complete(generated, tmp_path, "vtpmctl", "create", "x", "--tpm", "") == [
        "2",
        "1.2",
    ]
    assert "init" in _bash_complete(generated, tmp_path, "vtpmctl", "ctl", "alpha", "")
    assert _bash_complete(generated, tmp_path, "vtpmctl", "--timeout", "3", "statu") == ["status"]
    assert _bash_complete(generated, tmp_path, "vtpmctl", "ek", "export", "beta", "--p") == [
        "--pem"
    ]
