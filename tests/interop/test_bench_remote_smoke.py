"""bench/bench_remote.py still runs end to end against a real S3 server (--smoke; timings
unchecked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from s3_server import S3Server

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_remote.py"


def test_bench_remote_smoke(tmp_path: Path, s3: S3Server, s3_bucket: str) -> None:
    out = tmp_path / "r.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--json", str(out),
         "--endpoint", s3.endpoint, "--bucket", s3_bucket],
        env=s3.env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "| 1 instance: push (all new)" in done.stdout and "dedupe:" in done.stdout
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 5
    dedupe = data["dedupe"]
    assert dedupe["snapshots"] == 2 and 0 < dedupe["pushed_bytes"] < dedupe["plain_bytes"]
