#!/usr/bin/env python3
"""One command line under two checkouts, A B A B: median wall and CPU of each.

Each side runs with ``PYTHONPATH`` set to its tree (so the venv's vtpmctl,
and every child it starts, runs that tree's code), after one warm-up round.
``{t}`` (the side: before/after) and ``{i}`` (the round) in the command and
in ``--setup`` (a shell command run before each, untimed) make names unique.

    bench/bench_ab.py BEFORE_TREE AFTER_TREE [--rounds N] [--setup CMD] -- COMMAND...
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--setup", default=None)
    argv = sys.argv[1:]
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        ap.error("give the command after --")
    ns = ap.parse_args(argv[: argv.index("--")])
    command = argv[argv.index("--") + 1 :]
    env0 = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    trees = {"before": ns.before, "after": ns.after}
    walls: dict[str, list[float]] = {t: [] for t in trees}
    cpus: dict[str, list[float]] = {t: [] for t in trees}
    for i in range(ns.rounds + 1):
        for side, tree in trees.items():
            env = dict(env0, PYTHONPATH=tree)

            def fill(text: str, side: str = side, i: int = i) -> str:
                return text.replace("{i}", str(i)).replace("{t}", side)

            if i == 0:
                sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
                from benchlib import command_server_ready

                served = command_server_ready(command[0], env)
                sys.stderr.write(f"{side}: command server {'yes' if served else 'no'}\n")
            if ns.setup:
                setup = fill(ns.setup)
                subprocess.run(setup, shell=True, env=env, capture_output=True, check=False)
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            done = subprocess.run([fill(a) for a in command], env=env, capture_output=True)
            wall = (time.perf_counter() - t0) * 1000
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if done.returncode not in (0, 3):  # 3: status of a stopped instance
                sys.stderr.write(f"{side}: exit {done.returncode}: {done.stderr[-500:]!r}\n")
                return 1
            if i:  # round 0 warms up
                walls[side].append(wall)
                cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
                cpus[side].append(cpu * 1000)
    b, a = statistics.median(cpus["before"]), statistics.median(cpus["after"])
    print(
        f"{' '.join(command)}: before {statistics.median(walls['before']):.0f} / {b:.1f} ms, "
        f"after {statistics.median(walls['after']):.0f} / {a:.1f} ms (wall / CPU), "
        f"CPU after/before {a / b:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
