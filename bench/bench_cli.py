#!/usr/bin/env python3
"""The command line as scripts use it, next to swtpm's tools, A B A B in one run.

Each command is a whole process; rounds alternate the sides so that machine
noise hits both alike. Printed: median wall and CPU (user + system of the
command and the children it waits for) per command, and the ratio of the
medians, as markdown rows, with /proc/loadavg before and after.

* queries: ``vtpmctl caps unix:PATH`` vs ``swtpm_ioctl --unix PATH -c`` on
  one swtpm; ``caps|info|status NAME`` of a running instance;
  ``list --json`` with N running instances (``--instances``).
* state moves of a stopped instance, fresh and filled with NV indexes until
  the TPM has no NV space left (``--full``): ``migrate export``,
  ``migrate import``, ``snapshot create``, ``snapshot restore`` vs ``cp -a``
  of the state dir (and ``rm -rf`` + ``cp -a`` back for a restore).

    bench/bench_cli.py [--rounds N] [--instances N] [--full] [--smoke] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from benchlib import command_server_ready

HERE = Path(__file__).resolve().parent
VTPMCTL = str(Path(sys.executable).with_name("vtpmctl"))

Row = tuple[str, list[float], list[float], str, list[float], list[float]]


class BenchError(Exception):
    """The benchmark cannot run; the message says why."""


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run(argv: list[str], env: dict[str, str] | None = None, ok: tuple[int, ...] = (0,)) -> None:
    done = subprocess.run(argv, env=env, capture_output=True, timeout=300, check=False)
    if done.returncode not in ok:
        msg = done.stderr.decode(errors="replace").strip()
        raise BenchError(f"{' '.join(argv)} failed ({done.returncode}): {msg}")


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall and CPU milliseconds of fn (CPU: the children it waited for, to the microsecond)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall * 1000, max(0.0, cpu) * 1000


WARMUP = [True]


def alternate(
    rounds: int, a: Callable[[int], object], b: Callable[[int], object]
) -> tuple[list[float], list[float], list[float], list[float]]:
    """A B A B; one warm-up of each first (not in --smoke)."""
    if WARMUP[0]:
        a(-1)
        b(-1)
    aw, ac, bw, bc = [], [], [], []
    for i in range(rounds):
        w, c = timed(lambda i=i: a(i))  # type: ignore[misc]
        aw.append(w)
        ac.append(c)
        w, c = timed(lambda i=i: b(i))  # type: ignore[misc]
        bw.append(w)
        bc.append(c)
    return aw, ac, bw, bc


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vb-cli-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Store:
    """A private vtpmctl store (VTPMCTL_HOME) and its commands."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {**os.environ, "VTPMCTL_HOME": str(home)}
        self.running: list[str] = []

    def __call__(self, *args: str, ok: tuple[int, ...] = (0,)) -> None:
        run([VTPMCTL, *args], self.env, ok)

    def state_dir(self, name: str) -> Path:
        return self.home / "lib" / "instances" / name / "tpmstate"

    def start(self, name: str) -> None:
        self("start", name)
        self.running.append(name)

    def stop_all(self) -> None:
        for name in self.running:
            with contextlib.suppress(BenchError):
                self("stop", "--force", name)
        self.running.clear()


class Swtpm:
    """A real ``swtpm socket`` answering on a control socket."""

    def __init__(self, wd: Path) -> None:
        (wd / "swtpm").mkdir()
        self.ctrl = wd / "s.ctrl"
        self.proc = subprocess.Popen(
            [
                "swtpm",
                "socket",
                "--tpm2",
                "--tpmstate",
                f"dir={wd / 'swtpm'}",
                "--ctrl",
                f"type=unixio,path={self.ctrl}",
                "--flags",
                "not-need-init,startup-clear",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(300):
            if self.ctrl.exists():
                return
            time.sleep(0.01)
        raise BenchError("swtpm did not start")

    def stop(self) -> None:
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self.proc.kill()
        self.proc.wait()


def queries(store: Store, wd: Path, rounds: int, instances: int) -> list[Row]:
    rows: list[Row] = []
    sw = Swtpm(wd)
    try:
        ctrl = str(sw.ctrl)
        swtpm_c = ["swtpm_ioctl", "--unix", ctrl, "-c"]

        def sw_caps(_: int) -> None:
            run(swtpm_c)

        def vt_caps(_: int) -> None:
            run([VTPMCTL, "caps", f"unix:{ctrl}"], store.env)

        aw, ac, bw, bc = alternate(rounds, vt_caps, sw_caps)
        rows.append(("`caps unix:PATH`", aw, ac, "`swtpm_ioctl -c`", bw, bc))

        def sw_locality(_: int) -> None:
            run(["swtpm_ioctl", "--unix", ctrl, "-l", "0"])

        def vt_locality(_: int) -> None:
            run([VTPMCTL, "ctl", f"unix:{ctrl}", "locality", "0"], store.env)

        aw, ac, bw, bc = alternate(rounds, vt_locality, sw_locality)
        rows.append(("`ctl unix:PATH locality 0`", aw, ac, "`swtpm_ioctl -l 0`", bw, bc))
        store("create", "--no-ek", "q0")
        store.start("q0")
        own = str(store.home / "run" / "q0" / "tpm.ctrl")
        for what, ok in (("caps", (0,)), ("info", (0,)), ("status", (0,))):

            def vt_named(_: int, what: str = what, ok: tuple[int, ...] = ok) -> None:
                store(what, "q0", ok=ok)

            def sw_own(_: int) -> None:
                run(["swtpm_ioctl", "--unix", own, "-c"])

            aw, ac, bw, bc = alternate(rounds, vt_named, sw_own)
            rows.append((f"`{what} NAME`", aw, ac, "`swtpm_ioctl -c` (its socket)", bw, bc))
        for i in range(1, instances):
            store("create", "--no-ek", f"q{i}")
            store.start(f"q{i}")

        def vt_list(_: int) -> None:
            store("list", "--json")

        def ls_run(_: int) -> None:
            run(["ls", "-la", str(store.home / "run")])

        aw, ac, bw, bc = alternate(rounds, vt_list, ls_run)
        rows.append((f"`list --json`, {instances} running", aw, ac, "`ls -la` the run dir", bw, bc))
    finally:
        store.stop_all()
        sw.stop()
    return rows


def fill(store: Store, name: str, limit: int | None) -> int:
    """Fill NAME's NV with 2 KiB indexes (bench_bundles' way) while it runs."""
    sys.path.insert(0, str(HERE))
    from bench_bundles import fill_nv

    store.start(name)
    store("ctl", name, "init")  # as QEMU does first
    try:
        return fill_nv(store.home / "run" / name / "tpm", limit)
    finally:
        store.stop_all()


def moves(store: Store, wd: Path, rounds: int, full: bool, limit: int | None) -> list[Row]:
    rows: list[Row] = []
    name = "full" if full else "fresh"
    store("create", "--no-ek", name)
    if full:
        fill(store, name, limit)
    state = store.state_dir(name)
    copies = wd / f"copies-{name}"
    copies.mkdir()
    bundles = wd / f"bundles-{name}"
    bundles.mkdir()
    what = "full-NV" if full else "fresh"

    def vt_export(i: int) -> None:
        store("migrate", "export", name, "-o", str(bundles / f"{i}.bundle"))

    def cp_out(i: int) -> None:
        run(["cp", "-a", str(state), str(copies / f"out{i}")])

    aw, ac, bw, bc = alternate(rounds, vt_export, cp_out)
    rows.append((f"`migrate export`, {what}", aw, ac, "`cp -a` the state dir", bw, bc))

    def vt_import(i: int) -> None:
        store("migrate", "import", str(bundles / "0.bundle"), "--name", f"{name}-in{i + 1}")

    def cp_in(i: int) -> None:
        run(["cp", "-a", str(state), str(copies / f"in{i + 1}")])

    aw, ac, bw, bc = alternate(rounds, vt_import, cp_in)
    rows.append((f"`migrate import`, {what}", aw, ac, "`cp -a` the state dir", bw, bc))

    def vt_snap(_: int) -> None:
        store("snapshot", "create", name)

    aw, ac, bw, bc = alternate(rounds, vt_snap, cp_out)
    rows.append((f"`snapshot create`, {what}", aw, ac, "`cp -a` the state dir", bw, bc))
    store("snapshot", "create", name, "--label", "base")

    def vt_restore(_: int) -> None:
        store("snapshot", "restore", name, "base")

    def cp_back(_: int) -> None:
        back = copies / "back"
        run(["rm", "-rf", str(back)])
        run(["cp", "-a", str(state), str(back)])

    aw, ac, bw, bc = alternate(rounds, vt_restore, cp_back)
    rows.append((f"`snapshot restore`, {what}", aw, ac, "`rm -rf`, `cp -a` back", bw, bc))
    return rows


def report(rows: list[Row]) -> dict[str, dict[str, float]]:
    print("| median | vtpmctl wall / CPU ms | other side | wall / CPU ms | wall ratio |")
    print("|---|---|---|---|---|")
    out = {}
    for label, aw, ac, other, bw, bc in rows:
        a, b = statistics.median(aw), statistics.median(bw)
        ratio = a / b if b else float("inf")
        print(
            f"| {label} | {a:.1f} / {statistics.median(ac):.1f} | {other} "
            f"| {b:.1f} / {statistics.median(bc):.1f} | {ratio:.1f} |"
        )
        out[label] = {
            "wall_ms": a,
            "cpu_ms": statistics.median(ac),
            "other_wall_ms": b,
            "other_cpu_ms": statistics.median(bc),
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--instances", type=int, default=50, help="running for list --json")
    ap.add_argument("--full", action="store_true", help="also the moves of a full-NV TPM")
    ap.add_argument("--only", choices=("queries", "moves"), help="one half of the run")
    ap.add_argument("--smoke", action="store_true", help="a tiny run: does it work")
    ap.add_argument("--json", type=Path)
    ns = ap.parse_args()
    if ns.smoke:
        ns.rounds, ns.instances, WARMUP[0] = 1, 2, False
    for tool in ("swtpm", "swtpm_ioctl", "cp"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench_cli: {tool} is not installed")
    print(f"loadavg before: {loadavg()}; {sys.version.split()[0]}")
    rows: list[Row] = []
    with workdir() as wd:
        store = Store(wd / "home")
        served = command_server_ready(VTPMCTL, store.env)
        print(
            f"vtpmctl commands run by the command server: {'yes' if served else 'no'}"
            " (CPU then counts the console script only)"
        )
        try:
            if ns.only in (None, "queries"):
                rows += queries(store, wd, ns.rounds, ns.instances)
            if ns.only in (None, "moves"):
                rows += moves(store, wd, ns.rounds, False, None)
                if ns.full:
                    rows += moves(store, wd, ns.rounds, True, None)
        finally:
            store.stop_all()
    result = report(rows)
    print(f"loadavg after: {loadavg()}")
    if ns.json is not None:
        ns.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        raise SystemExit(f"bench_cli: {exc}") from None
