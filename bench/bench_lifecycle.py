#!/usr/bin/env python3
"""Start, stop, restart and memory of named vTPMs, next to swtpm 0.7.1, A B A B.

* start: ``vtpmctl start NAME`` (returns when the daemon serves) vs ``swtpm
  socket --daemon`` and then ``swtpm_ioctl -c`` until it answers, as a
  manager must;
* stop: ``vtpmctl stop NAME`` (returns when the process is gone) vs
  ``swtpm_ioctl -s`` and then waiting for the process to end;
* restart: ``vtpmctl restart NAME`` vs the two swtpm steps above;
* memory: N instances of each with EKs running at once, each after 100
  GetRandom(16) and 10 GET_CAPABILITY round trips: RSS and PSS from
  /proc/PID/smaps_rollup; then the same for encrypted vtpmctl instances.

Every command is a whole process (``subprocess.run``); wall time and CPU
(user + system of the command and the children it waited for; a daemon left
running is not counted). Medians, and the ratio of the medians. The load
average is printed with the figures.

    bench/bench_lifecycle.py [--rounds N] [--instances N] [--json FILE] [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from benchlib import GET_CAPABILITY, GETRANDOM16, command_server_ready, machine, median

VTPMCTL = str(Path(sys.executable).with_name("vtpmctl"))
TIMEOUT = 60.0


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def rollup(pid: int) -> dict[str, int]:
    """KiB of Rss and Pss of one process (smaps_rollup)."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            out[key] = int(rest.split()[0])
    return out


def run(argv: list[str], env: dict[str, str] | None = None) -> None:
    done = subprocess.run(argv, env=env, capture_output=True, timeout=TIMEOUT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {done.stderr.decode(errors='replace')}")


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    before = os.times()
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    after = os.times()
    cpu = after.children_user + after.children_system
    cpu -= before.children_user + before.children_system
    return wall, max(0.0, cpu)


def gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def exercise(data: Path, ctrl: Path) -> None:
    """100 GetRandom(16) on the data socket and 10 GET_CAPABILITY on the control one."""
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(data))
        for _ in range(100):
            s.sendall(GETRANDOM16)
            got = b""
            while len(got) < 10 or len(got) < int.from_bytes(got[2:6], "big"):
                got += s.recv(4096)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(ctrl))
        for _ in range(10):
            s.sendall(GET_CAPABILITY)
            s.recv(8)


class Vtpmctl:
    name = "vtpmctl"

    def __init__(self, root: Path) -> None:
        self.home = root / "vtpmctl"
        self.env = dict(os.environ, VTPMCTL_HOME=str(self.home))
        self.env.pop("NOTIFY_SOCKET", None)

    def create(self, n: str, encrypt: bool = False) -> None:
        run([VTPMCTL, "create", n, *(["--encrypt"] if encrypt else [])], self.env)

    def start(self, n: str) -> None:
        run([VTPMCTL, "start", n], self.env)

    def stop(self, n: str) -> None:
        run([VTPMCTL, "stop", n], self.env)

    def restart(self, n: str) -> None:
        run([VTPMCTL, "restart", n], self.env)

    def pid(self, n: str) -> int:
        return int((self.home / "run" / n / "pid").read_text())

    def sockets(self, n: str) -> tuple[Path, Path]:
        return self.home / "run" / n / "tpm", self.home / "run" / n / "tpm.ctrl"

    def init(self, n: str) -> None:
        """What firmware does before it sends commands: CMD_INIT, TPM2_Startup."""
        import socket

        run([VTPMCTL, "ctl", n, "init"], self.env)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.sockets(n)[0]))
            s.sendall(bytes.fromhex("80010000000c000001440000"))
            s.recv(4096)


class Swtpm:
    name = "swtpm"

    def __init__(self, root: Path) -> None:
        self.root = root / "swtpm"

    def _dir(self, n: str) -> Path:
        return self.root / n

    def create(self, n: str, encrypt: bool = False) -> None:
        d = self._dir(n)
        (d / "state").mkdir(parents=True)
        run(
            [
                "swtpm_setup",
                "--tpm2",
                "--tpmstate",
                str(d / "state"),
                "--createek",
                "--create-ek-cert",
                "--create-platform-cert",
                "--lock-nvram",
            ]
        )

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
                "--flags",
                "not-need-init,startup-clear",
            ]
        )
        deadline = time.monotonic() + TIMEOUT
        ctrl = ["swtpm_ioctl", "--unix", str(d / "tpm.ctrl"), "-c"]
        while subprocess.run(ctrl, capture_output=True, check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise SystemExit(f"swtpm {n} did not answer")

    def stop(self, n: str) -> None:
        pid = self.pid(n)
        run(["swtpm_ioctl", "--unix", str(self._dir(n) / "tpm.ctrl"), "-s"])
        deadline = time.monotonic() + TIMEOUT
        while not gone(pid) and time.monotonic() < deadline:
            time.sleep(0.0005)

    def restart(self, n: str) -> None:
        self.stop(n)
        self.start(n)

    def pid(self, n: str) -> int:
        return int((self._dir(n) / "pid").read_text())

    def sockets(self, n: str) -> tuple[Path, Path]:
        return self._dir(n) / "tpm", self._dir(n) / "tpm.ctrl"

    def init(self, n: str) -> None:
        pass  # started with not-need-init,startup-clear


@contextlib.contextmanager
def sides() -> Iterator[tuple[Vtpmctl, Swtpm]]:
    root = Path(tempfile.mkdtemp(prefix="bl-", dir="/tmp"))
    a, b = Vtpmctl(root), Swtpm(root)
    try:
        yield a, b
    finally:
        for pidfile in root.rglob("pid"):  # both sides' leftovers, if a round failed
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pidfile.read_text()), 9)
        shutil.rmtree(root, ignore_errors=True)


def memory(side: Vtpmctl | Swtpm, names: list[str]) -> dict[str, float]:
    """Median MiB of Rss and Pss of ``names`` running at once, each exercised."""
    for n in names:
        side.start(n)
    for n in names:
        side.init(n)
        exercise(*side.sockets(n))
    time.sleep(0.3)
    readings = [rollup(side.pid(n)) for n in names]
    for n in names:
        side.stop(n)
    return {k: median([r[k] / 1024 for r in readings]) for k in ("Rss", "Pss")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--instances", type=int, default=6, help="running at once for memory")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--smoke", action="store_true", help="1 round, 1 instance")
    ns = p.parse_args(argv)
    rounds, count = (1, 1) if ns.smoke else (ns.rounds, ns.instances)
    if not 1 <= rounds <= 200 or not 1 <= count <= 50:
        p.error("--rounds must be 1..200 and --instances 1..50")
    for tool in ("swtpm", "swtpm_setup", "swtpm_ioctl"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench_lifecycle: {tool} is not installed")
    times: dict[str, list[tuple[float, float]]] = {}
    loads = [loadavg()]
    mem: dict[str, dict[str, float]] = {}
    with sides() as (a, b):
        for side in (a, b):
            for i in range(count):
                side.create(f"m{i}")
        a.create("enc", encrypt=True)
        for i in range(count - 1):
            a.create(f"e{i}", encrypt=True)
        for side in (a, b):  # warm-up: the zygote, caches
            side.start("m0")
            side.stop("m0")
        served = command_server_ready(VTPMCTL, a.env)
        for i in range(rounds):
            for side in (a, b) if i % 2 == 0 else (b, a):
                for what in ("start", "restart", "stop"):
                    fn = getattr(side, what)
                    times.setdefault(f"{side.name} {what}", []).append(timed(lambda f=fn: f("m0")))
        loads.append(loadavg())
        names = [f"m{i}" for i in range(count)]
        mem["vtpmctl"] = memory(a, names)
        mem["swtpm"] = memory(b, names)
        mem["vtpmctl encrypted"] = memory(a, ["enc", *[f"e{i}" for i in range(count - 1)]])
        loads.append(loadavg())
    print(
        f"Machine: {machine()}; {rounds} rounds A B A B; {count} instances with EKs for "
        f"memory; /proc/loadavg at start, after the timings, at the end: {' | '.join(loads)}; "
        f"vtpmctl commands run by the command server: {'yes' if served else 'no'} (CPU then "
        "counts the console script only)\n"
    )
    print("| medians | vtpmctl wall / CPU | swtpm wall / CPU | wall ratio |")
    print("|---|---|---|---|")
    for what in ("start", "stop", "restart"):
        va, vb = times[f"vtpmctl {what}"], times[f"swtpm {what}"]
        wa, ca = median([x[0] for x in va]), median([x[1] for x in va])
        wb, cb = median([x[0] for x in vb]), median([x[1] for x in vb])
        print(
            f"| {what} | {wa * 1000:.1f} / {ca * 1000:.1f} ms | {wb * 1000:.1f} / "
            f"{cb * 1000:.1f} ms | {wa / wb:.1f} |"
        )
    print(f"\n| per running instance ({count} running) | RSS | PSS |")
    print("|---|---|---|")
    for name, figures in mem.items():
        print(f"| {name} | {figures['Rss']:.1f} MiB | {figures['Pss']:.1f} MiB |")
    if ns.json is not None:
        ns.json.write_text(
            json.dumps(
                {"machine": machine(), "loadavg": loads, "times": times, "memory_mib": mem},
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
