#!/usr/bin/env python3
"""Snapshots of a full-NV vTPM next to what swtpm users do: copy the dir, save/load blobs.

One vTPM is filled with 2 KiB NV indexes until TPM_RC_NV_SPACE (the largest
permanent state libtpms makes, about 143 KB), then, A B A B over ``--rounds``:

* stopped: ``vtpmctl snapshot create`` vs ``cp -a`` of the state dir;
  ``vtpmctl snapshot restore`` vs ``rm -rf`` + ``cp -a`` back;
* running: ``vtpmctl snapshot create`` (CMD_GET_STATEBLOB on the control
  channel) vs ``swtpm_ioctl --save permanent`` from a swtpm on the same state;
  ``vtpmctl snapshot restore --force`` (stop, restore, start) vs
  ``swtpm_ioctl --stop; --load permanent; -i``;
* in-process: ``SnapshotStore.create`` / ``read_blobs`` + ``replace_state``
  (the store without the CLI start-up) vs ``shutil.copytree``;
* space: the snapshot dir after all rounds vs the copies.

Every command is a whole process, timed from fork to exit (wall) and by the
CPU it and its children used (user + sys, which machine load barely moves).
Medians, and the wall ratio vtpmctl / swtpm side (below 1 is faster).

    bench/bench_snapshots.py [--rounds N] [--smoke] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchlib import exit_main, fill_nv, machine, median, timed_run, workdir

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from vtpmctl.store.snapshots import SnapshotStore, replace_state  # noqa: E402
from vtpmctl.store.statedir import StateDir  # noqa: E402

VTPMCTL = str(Path(sys.executable).with_name("vtpmctl"))


def shell(cmd: str) -> float:
    return timed_run(["sh", "-c", cmd])


def _pattern(n: int) -> bytes:
    return bytes([n & 0xFF]) * 2048


def du(path: Path) -> tuple[int, int]:
    """(bytes in files, bytes allocated for files and directories)."""
    apparent = allocated = 0
    for dirpath, _dirs, files in os.walk(path):
        allocated += os.lstat(dirpath).st_blocks * 512
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return apparent, allocated


def _cpu() -> float:
    """CPU seconds of this process plus every child it has reaped."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def alternate(
    rounds: int, a: Callable[[int], float], b: Callable[[int], float]
) -> tuple[list[float], list[float], list[float], list[float]]:
    """A B A B: wall seconds and CPU seconds (with children) of each side."""
    out: tuple[list[float], list[float], list[float], list[float]] = ([], [], [], [])
    for i in range(rounds):
        for fn, wall, cpu in ((a, out[0], out[2]), (b, out[1], out[3])):
            before = _cpu()
            wall.append(fn(i))
            cpu.append(_cpu() - before)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="1 round, 4 NV indexes")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ns = ap.parse_args()
    rounds = 1 if ns.smoke else ns.rounds
    for tool in ("swtpm", "swtpm_ioctl"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (apt-get install swtpm swtpm-tools)")

    rows: list[tuple[str, str, str, tuple[list[float], ...]]] = []
    with workdir("vsnap") as wd:
        env = dict(os.environ, VTPMCTL_HOME=str(wd / "h"))
        env.pop("NOTIFY_SOCKET", None)

        def vt(*args: str) -> float:
            return timed_run([VTPMCTL, *args], env=env)

        vt("create", "full", "--no-ek")
        vt("start", "full")
        vt("ctl", "full", "init")
        inst_dir = wd / "h" / "lib" / "instances" / "full"
        state = inst_dir / "tpmstate"
        run_dir = wd / "h" / "run" / "full"
        indexes = fill_nv(run_dir / "tpm", 4 if ns.smoke else None, _pattern)
        vt("stop", "full")
        permall = (state / "tpm2-00.permall").stat().st_size
        sw_state = wd / "sw"
        shutil.copytree(state, sw_state)
        (wd / "copies").mkdir()

        # -- stopped
        m = alternate(
            rounds,
            lambda i: vt("snapshot", "create", "full", "--label", f"s{i}"),
            lambda i: shell(f"cp -a {state} {wd}/copies/{i}"),
        )
        rows.append(("snapshot, stopped", "vtpmctl snapshot create", "cp -a state dir", m))
        m = alternate(
            rounds,
            lambda i: vt("snapshot", "restore", "full", f"s{i}"),
            lambda i: shell(f"rm -rf {sw_state} && cp -a {wd}/copies/{i} {sw_state}"),
        )
        rows.append(("restore, stopped", "vtpmctl snapshot restore", "rm -rf + cp -a back", m))

        # -- running: vtpmctl daemon and swtpm on the same (full) state
        vt("start", "full")
        vt("ctl", "full", "init")
        ctrl = wd / "sw.ctrl"
        swtpm = subprocess.Popen(
            [
                "swtpm",
                "socket",
                "--tpm2",
                "--tpmstate",
                f"dir={sw_state}",
                "--ctrl",
                f"type=unixio,path={ctrl}",
                "--server",
                f"type=unixio,path={wd}/sw.data",
                "--flags",
                "not-need-init,startup-clear",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 15
            while not ctrl.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            ioctl = ["swtpm_ioctl", "--unix", str(ctrl)]
            m = alternate(
                rounds,
                lambda i: vt("snapshot", "create", "full", "--label", f"r{i}"),
                lambda i: timed_run([*ioctl, "--save", "permanent", f"{wd}/blob{i}"]),
            )
            rows.append(
                ("snapshot, running", "vtpmctl snapshot create", "swtpm_ioctl --save permanent", m)
            )

            def sw_load(i: int) -> float:
                return (
                    timed_run([*ioctl, "--stop"])
                    + timed_run([*ioctl, "--load", "permanent", f"{wd}/blob{i}"])
                    + timed_run([*ioctl, "-i"])
                )

            def vt_restore(i: int) -> float:
                took = vt("snapshot", "restore", "full", f"r{i}", "--force")
                vt("ctl", "full", "init")  # not timed: firmware does this on either side
                return took

            m = alternate(rounds, vt_restore, sw_load)
            rows.append(
                (
                    "restore, running",
                    "vtpmctl snapshot restore --force",
                    "swtpm_ioctl --stop, --load, -i",
                    m,
                )
            )
        finally:
            swtpm.terminate()
            swtpm.wait(10)
            vt("stop", "full")

        # -- in-process: the store itself, without interpreter and CLI start-up
        plain = StateDir(state).load("permall")
        assert plain is not None
        lib = SnapshotStore(wd / "lib-snaps", None)
        target = StateDir(wd / "lib-state")
        target.ensure()

        def lib_create(i: int) -> float:
            start = time.perf_counter()
            lib.create({"permanent": plain + bytes([i])})  # a new object every round
            return time.perf_counter() - start

        def copy_tree(i: int) -> float:
            start = time.perf_counter()
            shutil.copytree(state, wd / f"lib-copy{i}", symlinks=True)
            return time.perf_counter() - start

        m = alternate(rounds, lib_create, copy_tree)
        rows.append(("snapshot, in-process", "SnapshotStore.create", "shutil.copytree", m))

        def lib_restore(i: int) -> float:
            start = time.perf_counter()
            snap = lib.all()[i]
            replace_state(target, lib.read_blobs(snap), note=snap.ref)
            return time.perf_counter() - start

        def copy_back(i: int) -> float:
            start = time.perf_counter()
            shutil.rmtree(wd / "lib-back", ignore_errors=True)
            shutil.copytree(wd / f"lib-copy{i}", wd / "lib-back", symlinks=True)
            return time.perf_counter() - start

        m = alternate(rounds, lib_restore, copy_back)
        rows.append(("restore, in-process", "read_blobs + replace_state", "rmtree + copytree", m))

        snaps_du = du(inst_dir / "snapshots")
        copies_du = du(wd / "copies")
        n_snaps = len(SnapshotStore(inst_dir / "snapshots", None).all())

    print(f"# Snapshots of a full-NV vTPM ({machine()})\n")
    print(
        f"{indexes} NV indexes of 2 KiB, permall {permall} bytes; {rounds} rounds, "
        f"A B A B; medians; load average {os.getloadavg()[0]:.1f} at the end\n"
    )
    print("| operation | vtpmctl | wall | CPU | swtpm side | wall | CPU | wall ratio |")
    print("|---|---|---:|---:|---|---:|---:|---:|")
    results = []
    for what, a_name, b_name, m in rows:
        wa, wb, ca, cb = (median(v) * 1000 for v in m)
        ratio = wa / wb if wb else 0.0
        print(
            f"| {what} | {a_name} | {wa:.1f} ms | {ca:.0f} ms | {b_name} | {wb:.1f} ms "
            f"| {cb:.0f} ms | {ratio:.0f} |"
        )
        results.append(
            {
                "operation": what,
                "vtpmctl": a_name,
                "vtpmctl_ms": wa,
                "vtpmctl_cpu_ms": ca,
                "other": b_name,
                "other_ms": wb,
                "other_cpu_ms": cb,
                "ratio": ratio,
            }
        )
    load = os.getloadavg()[0]
    print(
        f"\nspace: {n_snaps} snapshots (incl. safety snapshots) take {snaps_du[0]} bytes "
        f"in files, {snaps_du[1]} allocated; {rounds} copies of the state dir take "
        f"{copies_du[0]} bytes in files, {copies_du[1]} allocated"
    )
    if ns.json is not None:
        ns.json.write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "nv_indexes": indexes,
                    "permall_bytes": permall,
                    "rounds": rounds,
                    "load": load,
                    "results": results,
                    "space": {
                        "snapshots": n_snaps,
                        "snapshot_dir": snaps_du,
                        "copies": rounds,
                        "copies_dir": copies_du,
                    },
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    exit_main(main, "bench_snapshots")
