"""The import contracts of pyproject.toml (docs/architecture.md): kept by the tree, and
able to fail: a copy of the tree with one import that points the wrong way breaks them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = "each layer imports only the layers below it"
NO_ENGINE = "the CLI never loads libtpms"
ONE_BOTO3 = "only the remote client imports boto3"


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """Run lint-imports on the tree at ``root`` with the contracts of its pyproject.toml."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from importlinter.cli import lint_imports_command;"
            " sys.exit(lint_imports_command())",
            "--no-cache",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_tree_keeps_its_contracts() -> None:
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("module", "line", "broken", "chain"),
    [
        # The client reaching for the engine: the CLI would load libtpms.
        (
            "device/client/control.py",
            "import vtpmctl.engine.tpm",
            NO_ENGINE,
            "vtpmctl.device.client.control -> vtpmctl.engine.tpm",
        ),
        # The store importing from above it, inside a function as most imports are.
        (
            "store/atomic.py",
            "def _up() -> None:\n    import vtpmctl.commands.output",
            LAYERS,
            "vtpmctl.store.atomic -> vtpmctl.commands.output",
        ),
        # A use case calling boto3 itself, past the client that maps its errors.
        (
            "usecases/remote.py",
            "def _s3() -> None:\n    import boto3",
            ONE_BOTO3,
            "vtpmctl.usecases.remote -> boto3",
        ),
    ],
)
def test_a_wrong_import_breaks_a_contract(
    tmp_path: Path, module: str, line: str, broken: str, chain: str
) -> None:
    shutil.copytree(
        ROOT / "vtpmctl", tmp_path / "vtpmctl", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "vtpmctl" / module
    target.write_text(target.read_text() + "\n\n" + line + "\n")

    done = lint_imports(tmp_path)

    out = " ".join(done.stdout.split())
    assert done.returncode == 1, out
    assert f"{broken}" in out and "BROKEN" in out
    assert chain in out
