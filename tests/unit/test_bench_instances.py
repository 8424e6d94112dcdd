"""bench/bench_instances.py still runs end to end (its smoke mode; timings unchecked)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_instances.py"


@pytest.mark.skipif(shutil.which("swtpm_setup") is None, reason="swtpm_setup not installed")
def test_bench_instances_smoke() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for row in ("create, EKs + certificates", "start (control channel answers)", "RSS", "PSS"):
        assert row in done.stdout
