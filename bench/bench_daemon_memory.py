#!/usr/bin/env python3
"""Where a forked daemon's memory goes: the interpreter's floor, the zygote, each daemon.

* floor: RSS (anonymous and file-backed) of this interpreter, a fresh process
  for each step towards the zygote: bare; with ctypes, socket, threading and
  signal; with libtpms (and libcrypto) mapped; with the zygote's imports and
  its start-up work; after ``malloc_trim``. A forked daemon inherits every
  anonymous page of the zygote, so its RSS cannot be lower than the zygote's
  anonymous memory plus the library pages it runs.
* daemons: N instances with EKs started by ``vtpmctl start`` one after the
  other, each exercised as in bench_lifecycle.py (100 GetRandom(16), 10
  GET_CAPABILITY). For the median one, per mapping: RSS, PSS and private
  memory, and (as root, from ``/proc/PID/pagemap``) its pages still shared
  with the zygote, copied from it (written since the fork) and new.
* what the zygote's own work costs the daemons it forked before: the first
  daemon's private memory after its start and after each later start.

Run it with PYTHONPATH naming the tree to measure, as bench_lifecycle.py:

    PYTHONPATH=$PWD .venv/bin/python bench/bench_daemon_memory.py [--instances N] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import struct
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from bench_lifecycle import exercise, loadavg, rollup, sides
from benchlib import machine, median

PAGE = os.sysconf("SC_PAGE_SIZE")

# Each step is a fresh interpreter; the last line it prints is smaps_rollup's figures.
ROLLUP = (
    "def _rollup():\n"
    "    f = {}\n"
    "    for line in open('/proc/self/smaps_rollup'):\n"
    "        k, _, v = line.partition(':')\n"
    "        if v.strip().endswith('kB'):\n"
    "            f[k] = int(v.split()[0])\n"
    "    print(f['Rss'], f['Anonymous'])\n"
)
ZYGOTE = (  # what ``_zygote`` does before it serves (an older tree: what it did)
    "import gc\n"
    "from vtpmctl.device.server import zygote\n"
    "if hasattr(zygote, 'settle'):\n"
    "    zygote.prepare()\n"
    "    zygote.settle()\n"
    "else:\n"
    "    zygote.libtpms.preload()\n"
    "    zygote.daemon.parser()\n"
    "    zygote._sources()\n"
    "    gc.collect()\n"
)
STEPS = [
    ("bare interpreter", ""),
    ("+ ctypes, socket, threading, signal", "import ctypes, socket, threading, signal\n"),
    (
        "+ libtpms.so.0 (and libcrypto) mapped",
        "import ctypes, socket, threading, signal\nctypes.CDLL('libtpms.so.0')\n",
    ),
    ("+ the zygote's imports and start-up", ZYGOTE),
    (
        "+ malloc_trim (what the zygote serves from)",
        ZYGOTE + "import ctypes\nctypes.CDLL(None).malloc_trim(0)\n",
    ),
]


def floor() -> list[tuple[str, int, int]]:
    """(step, RSS KiB, anonymous KiB) of a fresh interpreter at each step."""
    out = []
    for name, code in STEPS:
        done = subprocess.run(
            [sys.executable, "-c", ROLLUP + code + "_rollup()\n"],
            capture_output=True,
            text=True,
            check=True,
            cwd="/",
        )
        rss, anon = (int(x) for x in done.stdout.split()[-2:])
        out.append((name, rss, anon))
    return out


def private_dirty(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1])
    return 0


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def maps(pid: int) -> list[tuple[int, int, str]]:
    """(start, end, name) of each mapping; anonymous ones are named ``[anon]``."""
    out = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(None, 5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        name = fields[5].strip() if len(fields) > 5 else "[anon]"
        out.append((start, end, Path(name).name if name.startswith("/") else name))
    return out


def frames(pid: int, start: int, end: int) -> list[int | None]:
    """The physical frame of each page (None: not present); all 0 unless root."""
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(start // PAGE * 8)
        data = f.read((end - start) // PAGE * 8)
    return [e & ((1 << 55) - 1) if e >> 63 else None for (e,) in struct.iter_unpack("<Q", data)]


def by_mapping(pid: int, zygote: int) -> tuple[dict[str, Counter[str]], bool]:
    """KiB per mapping name: smaps' Rss, Pss, private; pagemap's shared, copied, new."""
    out: dict[str, Counter[str]] = defaultdict(Counter)
    name = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if not fields[0].endswith(":"):
            name = fields[5] if len(fields) > 5 else "[anon]"
            name = Path(name).name if name.startswith("/") else name
        elif fields[0] in ("Rss:", "Pss:"):
            out[name][fields[0][:-1]] += int(fields[1])
        elif fields[0] in ("Private_Dirty:", "Private_Clean:"):
            out[name]["Private"] += int(fields[1])
    frames_seen = False
    theirs = {(s, e): n for s, e, n in maps(zygote)}
    for start, end, name in maps(pid):
        if name in ("[vsyscall]", "[vvar]", "[vdso]"):
            continue
        mine = frames(pid, start, end)
        other = frames(zygote, start, end) if (start, end) in theirs else [None] * len(mine)
        for a, b in zip(mine, other, strict=True):
            if a is None:
                continue
            frames_seen = frames_seen or a != 0
            kind = "new" if b is None else "shared" if a == b else "copied"
            out[name][kind] += PAGE // 1024
    return out, frames_seen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--instances", type=int, default=6, help="running at once")
    p.add_argument("--smoke", action="store_true", help="2 instances")
    ns = p.parse_args(argv)
    count = 2 if ns.smoke else ns.instances
    if not 2 <= count <= 50:
        p.error("--instances must be 2..50")
    loads = [loadavg()]
    steps = floor()
    with sides() as (side, _):
        names = [f"m{i}" for i in range(count)]
        for n in names:
            side.create(n)
        side.start(names[0])  # the zygote starts with the first daemon
        first = side.pid(names[0])
        after_starts = [private_dirty(first)]
        for n in names[1:]:
            side.start(n)
            after_starts.append(private_dirty(first))
        for n in names:
            side.init(n)
            exercise(*side.sockets(n))
        time.sleep(0.3)
        pids = [side.pid(n) for n in names]
        pss = {pid: rollup(pid)["Pss"] for pid in pids}
        chosen = sorted(pids, key=lambda pid: pss[pid])[len(pids) // 2]
        zygote = parent(chosen)
        rows, frames_seen = by_mapping(chosen, zygote)
        totals = {pid: rollup(pid) for pid in (*pids, zygote)}
        for n in names:
            side.stop(n)
    loads.append(loadavg())
    print(f"Machine: {machine()}; /proc/loadavg at start and end: {' | '.join(loads)}\n")
    print("| a fresh interpreter | RSS | of which anonymous | file-backed |")
    print("|---|---|---|---|")
    for name, rss, anon in steps:
        mib = [f"{kib / 1024:.1f} MiB" for kib in (rss, anon, rss - anon)]
        print(f"| {name} | {' | '.join(mib)} |")
    daemons = [totals[pid] for pid in pids]
    daemon_rss = median([d["Rss"] for d in daemons]) / 1024
    print(
        f"\n{count} daemons running, exercised: RSS {daemon_rss:.1f}"
        f" MiB, PSS {median([d['Pss'] for d in daemons]) / 1024:.1f} MiB (medians); the zygote"
        f" RSS {totals[zygote]['Rss'] / 1024:.1f} MiB, PSS {totals[zygote]['Pss'] / 1024:.1f} MiB"
    )
    print(
        f"\nThe first daemon's private memory (KiB) after its start and after each later start: "
        f"{', '.join(map(str, after_starts))}"
    )
    print(
        f"\n| the median daemon (pid {chosen}), KiB | RSS | PSS | private | shared | copied | new |"
    )
    print("|---|---|---|---|---|---|---|")
    order = sorted(rows.items(), key=lambda kv: -kv[1]["Rss"])
    for name, c in order:
        if c["Rss"] < 64:
            continue
        share = f"{c['shared']} | {c['copied']} | {c['new']}" if frames_seen else "- | - | -"
        print(f"| {name} | {c['Rss']} | {c['Pss']} | {c['Private']} | {share} |")
    rest = [c for _, c in order if c["Rss"] < 64]
    print(
        f"| {len(rest)} others | {sum(c['Rss'] for c in rest)} | {sum(c['Pss'] for c in rest)} |"
        f" {sum(c['Private'] for c in rest)} | | | |"
    )
    if not frames_seen:
        print("\n(shared, copied and new need root: /proc/PID/pagemap hides frames otherwise)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
