"""bench/bench_snapshots.py still runs end to end (its --smoke mode; timings unchecked)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_snapshots.py"


@pytest.mark.skipif(
    shutil.which("swtpm") is None or shutil.which("swtpm_ioctl") is None,
    reason="swtpm or swtpm_ioctl not installed",
)
def test_bench_snapshots_smoke(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "| snapshot, running |" in done.stdout and "space:" in done.stdout
    data = json.loads(out.read_text())
    assert len(data["results"]) == 6 and data["space"]["snapshots"] >= 2
