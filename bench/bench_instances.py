#!/usr/bin/env python3
"""Named instances next to swtpm_setup + swtpm: create time, start time, memory.

Rounds alternate A B A B so that machine noise hits both sides alike; medians
and ratios are printed as a markdown table.

* create: ``vtpmctl create`` (EKs, certificates, platform certificate, NV
  locked) vs ``swtpm_setup --tpm2 --createek --create-ek-cert
  --create-platform-cert --lock-nvram``; and without EKs on both sides.
* start: ``vtpmctl start`` (returns when the control channel answers) vs
  ``swtpm socket --daemon`` followed by waiting for its control channel, as a
  manager must; then both are stopped (``vtpmctl stop``, ``swtpm_ioctl -s``
  and waiting for the process to end).
* CPU is user + system time of the command and the children it waits for (a
  daemon left running is not counted).
* memory: N instances of each running at once; RSS and PSS per process.

    bench/bench_instances.py [--rounds N] [--instances N] [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from benchlib import machine, median, vm_rss_kib

HERE = Path(__file__).resolve().parent
VTPMCTL = str(Path(sys.executable).with_name("vtpmctl"))


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def run(argv: list[str], env: dict[str, str] | None = None) -> None:
    result = subprocess.run(argv, env=env, capture_output=True, timeout=120, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {result.stderr.decode(errors='replace')}")


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    """Wall time, and CPU (user + system) of the command and the children it waited for."""
    before = os.times()
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    after = os.times()
    cpu = (
        after.children_user + after.children_system - before.children_user - before.children_system
    )
    return wall, max(0.0, cpu)


def caps_answer(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            s.connect(str(path))
            s.sendall(b"\0\0\0\1")
            return len(s.recv(8)) == 8
    except OSError:
        return False


class Side:
    """One tool's way of making and running named vTPMs under a private dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = dict(os.environ, VTPMCTL_HOME=str(root / "home"))
        self.env.pop("NOTIFY_SOCKET", None)


class Vtpmctl(Side):
    name = "vtpmctl"

    def create(self, n: str, ek: bool) -> None:
        run([VTPMCTL, "create", n] + ([] if ek else ["--no-ek"]), self.env)

    def start(self, n: str) -> None:
        run([VTPMCTL, "start", n], self.env)

    def pid(self, n: str) -> int:
        return int((self.root / "home" / "run" / n / "pid").read_text())

    def stop(self, n: str) -> None:
        run([VTPMCTL, "stop", n], self.env)


class Swtpm(Side):
    name = "swtpm"

    def _dir(self, n: str) -> Path:
        return self.root / "swtpm" / n

    def create(self, n: str, ek: bool) -> None:
        d = self._dir(n)
        (d / "state").mkdir(parents=True)
        extra = (
            ["--createek", "--create-ek-cert", "--create-platform-cert", "--lock-nvram"]
            if ek
            else []
        )
        run(["swtpm_setup", "--tpm2", "--tpmstate", str(d / "state"), *extra])

    def start(self, n: str) -> None:
        d = self._dir(n)
        run(
            [
                "swtpm",
                "socket",
                "--tpm2",
                "--daemon",
                "--tpmstate",
                f"dir={d / 'state'}",
                "--ctrl",
                f"type=unixio,path={d / 'tpm.ctrl'}",
                "--server",
                f"type=unixio,path={d / 'tpm'}",
                "--pid",
                f"file={d / 'pid'}",
                "--log",
                f"file={d / 'log'}",
            ]
        )
        deadline = time.monotonic() + 10
        while not caps_answer(d / "tpm.ctrl"):
            if time.monotonic() > deadline:
                raise SystemExit(f"swtpm {n} did not answer")
            time.sleep(0.002)

    def pid(self, n: str) -> int:
        return int((self._dir(n) / "pid").read_text())

    def stop(self, n: str) -> None:
        pid = self.pid(n)
        run(["swtpm_ioctl", "--unix", str(self._dir(n) / "tpm.ctrl"), "-s"])
        deadline = time.monotonic() + 10
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.002)


def alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@contextlib.contextmanager
def sides() -> Iterator[tuple[Vtpmctl, Swtpm]]:
    root = Path(tempfile.mkdtemp(prefix="bi-", dir="/tmp"))
    a, b = Vtpmctl(root), Swtpm(root)
    try:
        yield a, b
    finally:
        for pidfile in root.rglob("pid"):  # both sides' leftovers, if a round failed
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pidfile.read_text()), 9)
        shutil.rmtree(root, ignore_errors=True)


def row(what: str, a: list[tuple[float, float]], b: list[tuple[float, float]]) -> str:
    """Medians of wall and CPU time, and the wall-time ratio."""
    wa, ca = median([x[0] for x in a]), median([x[1] for x in a])
    wb, cb = median([x[0] for x in b]), median([x[1] for x in b])
    return (
        f"| {what} | {wa * 1000:.0f} / {ca * 1000:.0f} ms | {wb * 1000:.0f} / "
        f"{cb * 1000:.0f} ms | {wa / wb:.1f} |"
    )


def mem_row(what: str, a: list[float], b: list[float]) -> str:
    ma, mb = median(a), median(b)
    return f"| {what} | {ma / 1024:.1f} MiB | {mb / 1024:.1f} MiB | {ma / mb:.1f} |"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--instances", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="1 round, 1 instance")
    ns = p.parse_args()
    rounds, count = (1, 1) if ns.smoke else (ns.rounds, ns.instances)
    for tool in ("swtpm", "swtpm_setup", "swtpm_ioctl"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench_instances: {tool} is not installed")
    times: dict[str, list[tuple[float, float]]] = {}
    with sides() as (a, b):
        for i in range(rounds):
            for side in (a, b) if i % 2 == 0 else (b, a):
                for ek in (True, False):
                    n = f"{'e' if ek else 'n'}{i}"
                    key = f"{side.name} create{'' if ek else ' --no-ek'}"
                    times.setdefault(key, []).append(
                        timed(lambda s=side, n=n, ek=ek: s.create(n, ek))
                    )
                n = f"e{i}"
                times.setdefault(f"{side.name} start", []).append(
                    timed(lambda s=side, n=n: s.start(n))
                )
                times.setdefault(f"{side.name} stop", []).append(
                    timed(lambda s=side, n=n: s.stop(n))
                )
        mem: dict[str, tuple[list[float], list[float]]] = {}
        for side in (a, b):
            names = [f"e{i % rounds}" for i in range(count)] if count <= rounds else None
            if names is None:
                names = [f"m{i}" for i in range(count)]
                for n in names:
                    side.create(n, False)
            for n in names:
                side.start(n)
            pids = [side.pid(n) for n in names]
            mem[side.name] = (
                [float(vm_rss_kib(p)) for p in pids],
                [float(pss_kib(p)) for p in pids],
            )
            for n in names:
                side.stop(n)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"Machine: {machine()}; load average {load}; {rounds} rounds A B A B, {count} "
        "instances for memory.\n"
    )
    print("| medians | vtpmctl wall / CPU | swtpm_setup, swtpm wall / CPU | wall ratio |")
    print("|---|---|---|---|")
    print(row("create, EKs + certificates", times["vtpmctl create"], times["swtpm create"]))
    print(row("create, no EK", times["vtpmctl create --no-ek"], times["swtpm create --no-ek"]))
    print(row("start (control channel answers)", times["vtpmctl start"], times["swtpm start"]))
    print(row("stop", times["vtpmctl stop"], times["swtpm stop"]))
    print("\n| per running instance | vtpmctl daemon | swtpm | ratio |")
    print("|---|---|---|---|")
    print(mem_row("RSS", mem["vtpmctl"][0], mem["swtpm"][0]))
    print(mem_row("PSS", mem["vtpmctl"][1], mem["swtpm"][1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
