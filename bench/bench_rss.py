"""Idle resident memory of the servers: VmRSS from /proc after startup and a
few commands, swtpm next to vtpmctl (``vtpmctl serve`` and the daemon module).

    .venv/bin/python bench/bench_rss.py [--repeat 3] [--commands 100]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchlib import (
    Server,
    exit_main,
    machine,
    make_servers,
    median,
    python_round_trips,
    running,
    vm_rss_kib,
    workdir,
)

SETTLE = 0.3  # seconds between the last command and the reading


def measure(kind: str, commands: int) -> dict[str, int]:
    """KiB of VmRSS for swtpm and vtpmctl (server ``kind``) after ``commands`` each."""
    out: dict[str, int] = {}
    with workdir("vb-rss-") as wd:
        servers = make_servers(wd, None, kind)
        with running(servers):
            for srv in servers.values():
                _exercise(srv, commands)
            time.sleep(SETTLE)
            for name, srv in servers.items():
                out[name] = vm_rss_kib(srv.pid)
    return out


def _exercise(srv: Server, commands: int) -> None:
    python_round_trips("data", srv.data, commands, 0)
    python_round_trips("ctrl", srv.ctrl, max(1, commands // 10), 0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeat", type=int, default=3, help="fresh servers per variant")
    p.add_argument("--commands", type=int, default=100, help="GetRandom round trips first")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--smoke", action="store_true", help="one repeat, few commands")
    ns = p.parse_args(argv)
    if ns.smoke:
        ns.repeat, ns.commands = 1, 10
    if not 1 <= ns.repeat <= 20 or not 1 <= ns.commands <= 1_000_000:
        p.error("--repeat must be 1..20 and --commands 1..1000000")
    samples: dict[str, list[float]] = {"swtpm": [], "vtpmctl serve": [], "vtpmctl daemon": []}
    for _ in range(ns.repeat):
        for kind in ("serve", "daemon"):
            kib = measure(kind, ns.commands)
            samples["swtpm"].append(kib["swtpm"] / 1024)
            samples[f"vtpmctl {kind}"].append(kib["vtpmctl"] / 1024)
    print(f"machine: {machine()}")
    print(
        f"VmRSS after startup, {ns.commands} GetRandom and {max(1, ns.commands // 10)} "
        f"GET_CAPABILITY round trips (median of {len(samples['vtpmctl serve'])}):"
    )
    result = {name: median(vals) for name, vals in samples.items()}
    for name, mib in result.items():
        print(f"  {name:16s} {mib:6.1f} MiB")
    if ns.json is not None:
        ns.json.write_text(
            json.dumps({"machine": machine(), "rss_mib": result, "samples": samples}, indent=2)
            + "\n"
        )
    return 0


if __name__ == "__main__":
    exit_main(main, "bench_rss")
