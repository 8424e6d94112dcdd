"""The benchmark scripts still run: each once in its tiny smoke mode.

Timings are not checked here; only that the scripts work end to end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"

needs_swtpm = pytest.mark.skipif(shutil.which("swtpm") is None, reason="swtpm not installed")


def _run(argv: list[str], timeout: float = 300) -> str:
    # The scripts run this interpreter (a worktree has no .venv of its own).
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, env=env
    )
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@needs_swtpm
@pytest.mark.parametrize("client", ["c", "python"])
def test_bench_socket_smoke(client: str, tmp_path: Path) -> None:
    out = _run(
        [
            sys.executable,
            str(BENCH / "bench_socket.py"),
            "--smoke",
            "--client",
            client,
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert "GetRandom(16)" in out and "GET_CAPABILITY" in out and "ratio" in out
    assert (tmp_path / "r.json").read_text().startswith("{")


@needs_swtpm
def test_bench_rss_smoke() -> None:
    out = _run([sys.executable, str(BENCH / "bench_rss.py"), "--smoke"])
    assert "swtpm" in out and "vtpmctl daemon" in out


@needs_swtpm
@pytest.mark.skipif(
    shutil.which("hyperfine") is None or shutil.which("swtpm_ioctl") is None,
    reason="hyperfine or swtpm_ioctl not installed",
)
def test_bench_startup_smoke() -> None:
    out = _run(["bash", str(BENCH / "bench_startup.sh"), "--smoke"])
    assert "vtpmctl caps / swtpm_ioctl -c" in out


@needs_swtpm
def test_bench_cli_smoke() -> None:
    out = _run([sys.executable, str(BENCH / "bench_cli.py"), "--smoke"])
    assert "`caps unix:PATH`" in out and "`snapshot restore`, fresh" in out


def test_bench_ab_smoke() -> None:
    root = str(BENCH.parent)
    out = _run(
        [sys.executable, str(BENCH / "bench_ab.py"), root, root, "--rounds", "1", "--"]
        + [sys.executable, "-c", "import vtpmctl"]
    )
    assert "CPU after/before" in out


@needs_swtpm
@pytest.mark.skipif(shutil.which("swtpm_setup") is None, reason="swtpm_setup not installed")
def test_bench_lifecycle_smoke(tmp_path: Path) -> None:
    out = _run(
        [
            sys.executable,
            str(BENCH / "bench_lifecycle.py"),
            "--smoke",
            "--json",
            str(tmp_path / "r"),
        ]
    )
    for row in ("| start |", "| stop |", "| restart |", "| vtpmctl |", "| vtpmctl encrypted |"):
        assert row in out
    assert (tmp_path / "r").read_text().startswith("{")


@needs_swtpm
@pytest.mark.skipif(shutil.which("swtpm_setup") is None, reason="swtpm_setup not installed")
def test_bench_daemon_memory_smoke() -> None:
    out = _run([sys.executable, str(BENCH / "bench_daemon_memory.py"), "--smoke"])
    for row in ("| bare interpreter |", "2 daemons running", "| [heap] |", "libpython"):
        assert row in out
