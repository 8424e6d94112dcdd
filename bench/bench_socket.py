"""Round trips on the data and control sockets, swtpm and vtpmctl side by side.

Both servers run at once on the same CPU as the client (``taskset -c CPU``);
each round measures swtpm then vtpmctl (A B A B …) with a C client compiled
here (a Python client if there is no cc):

* data: TPM2_GetRandom(16) round trips on the data socket;
* ctrl: CMD_GET_CAPABILITY round trips on the control socket.

Prints per-round rates, medians and the vtpmctl/swtpm ratio of the medians.

    .venv/bin/python bench/bench_socket.py [--rounds 7] [--count 50000] [--cpu 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchlib import (
    RoundTrips,
    build_c_client,
    cpu_ns,
    exit_main,
    machine,
    make_servers,
    median,
    run_client,
    running,
    server_kind_default,
    workdir,
)

NAMES = ("swtpm", "vtpmctl")
MODES = {"data": "GetRandom(16)", "ctrl": "GET_CAPABILITY"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=7, help="A B rounds (default 7)")
    p.add_argument("--count", type=int, default=50000, help="round trips per measurement")
    p.add_argument("--warmup", type=int, default=2000, help="untimed round trips first")
    p.add_argument(
        "--cpu", type=int, default=0, help="CPU for servers and client; -1 leaves them unpinned"
    )
    p.add_argument(
        "--client",
        choices=["c", "python"],
        default="c",
        help="round-trip client (c falls back to python without cc)",
    )
    p.add_argument(
        "--server",
        choices=["serve", "daemon"],
        default=None,
        help="vtpmctl serve or python -m vtpmctl _daemon (default: serve when available)",
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument(
        "--smoke", action="store_true", help="a few round trips, one round: checks the script works"
    )
    ns = p.parse_args(argv)
    if ns.smoke:
        ns.rounds, ns.count, ns.warmup = 1, 200, 20
    if not 1 <= ns.rounds <= 100 or not 1 <= ns.count <= 5_000_000:
        p.error("--rounds must be 1..100 and --count 1..5000000")
    return ns


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    cpu = None if ns.cpu < 0 else ns.cpu
    kind = ns.server or server_kind_default()
    results: dict[str, dict[str, list[RoundTrips]]] = {
        mode: {name: [] for name in NAMES} for mode in MODES
    }
    with workdir("vb-sock-") as wd:
        client = build_c_client(wd) if ns.client == "c" else None
        servers = make_servers(wd, cpu, kind)
        with running(servers):
            for rnd in range(ns.rounds):
                for mode in MODES:  # A B back to back: each pair sees the same load
                    for name in NAMES:
                        srv = servers[name]
                        path = srv.data if mode == "data" else srv.ctrl
                        before = cpu_ns(srv.pid)
                        res = run_client(client, mode, path, ns.count, ns.warmup, cpu)
                        res.server_cpu_ns = (cpu_ns(srv.pid) - before) / (ns.count + ns.warmup)
                        results[mode][name].append(res)
                print(
                    f"round {rnd + 1}/{ns.rounds}: "
                    + "  ".join(
                        f"{mode} {name} {results[mode][name][-1].rate / 1000:.1f}k/s"
                        for mode in MODES
                        for name in NAMES
                    ),
                    flush=True,
                )
    print()
    print(f"machine: {machine()}")
    print(f"pinned to CPU {cpu}" if cpu is not None else "unpinned")
    print(
        f"client: {'C (rtclient.c)' if client else 'Python'}; vtpmctl server: {kind}; "
        f"{ns.rounds} rounds x {ns.count} round trips"
    )
    summary: dict[str, dict[str, float]] = {}
    for mode, label in MODES.items():
        med = {name: median([r.rate for r in results[mode][name]]) for name in NAMES}
        p50 = {name: median([r.p50_ns / 1000 for r in results[mode][name]]) for name in NAMES}
        srv_us = {
            name: median([r.server_cpu_ns / 1000 for r in results[mode][name]]) for name in NAMES
        }
        ratio = med["vtpmctl"] / med["swtpm"] if med["swtpm"] else 0.0
        per_round = [
            v.rate / s.rate
            for s, v in zip(results[mode]["swtpm"], results[mode]["vtpmctl"], strict=True)
        ]
        paired = median(per_round)
        summary[mode] = {
            "swtpm_per_s": med["swtpm"],
            "vtpmctl_per_s": med["vtpmctl"],
            "paired_ratio": paired,
            "swtpm_p50_us": p50["swtpm"],
            "vtpmctl_p50_us": p50["vtpmctl"],
            "swtpm_server_cpu_us": srv_us["swtpm"],
            "vtpmctl_server_cpu_us": srv_us["vtpmctl"],
            "ratio": ratio,
            "ratio_min": min(per_round),
            "ratio_max": max(per_round),
        }
        print(
            f"{label:15s} swtpm {med['swtpm'] / 1000:7.1f}k/s (p50 {p50['swtpm']:.1f} us)  "
            f"vtpmctl {med['vtpmctl'] / 1000:7.1f}k/s (p50 {p50['vtpmctl']:.1f} us)  "
            f"ratio {ratio:.2f}"
        )
        print(
            f"{'':15s} per-round ratios: median {paired:.2f}, "
            f"range {min(per_round):.2f}..{max(per_round):.2f}"
        )
        print(
            f"{'':15s} server CPU per round trip: swtpm {srv_us['swtpm']:.1f} us, "
            f"vtpmctl {srv_us['vtpmctl']:.1f} us"
        )
    if ns.json is not None:
        ns.json.write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "cpu": cpu,
                    "client": "c" if client else "python",
                    "server": kind,
                    "rounds": ns.rounds,
                    "count": ns.count,
                    "summary": summary,
                    "rates": {
                        mode: {name: [r.rate for r in results[mode][name]] for name in NAMES}
                        for mode in MODES
                    },
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    exit_main(main, "bench_socket")
