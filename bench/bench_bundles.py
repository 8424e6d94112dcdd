#!/usr/bin/env python3
"""Migration bundles of a full-NV vTPM next to what swtpm users do to move state.

One vTPM (with EKs) is filled with 2 KiB NV indexes until TPM_RC_NV_SPACE
(the largest permanent state libtpms makes, about 143 KB). Then, A B A B over
``--rounds``, each command a whole process timed from fork to exit:

* export: ``vtpmctl migrate export NAME -o F`` (stopped instance) vs ``cp -a``
  of the state dir vs ``swtpm_ioctl --save permanent F`` from a running swtpm;
* import: ``vtpmctl migrate import F`` into an empty store vs ``cp -a`` back vs
  ``swtpm_ioctl --stop; --load permanent F; -i`` into a second swtpm;
* pipe: ``vtpmctl migrate export - | vtpmctl migrate import -`` vs
  ``tar c | tar x`` (what ``tar | ssh tar`` does, without the network);
* keyed: export and import with a migration key;
* parts: in this process, ``build_bundle`` and ``open_bundle`` (the format:
  tar, hashes, AES/HMAC), and ``inspect_blobs`` (ValidateState in a fresh
  process), the parts of an import besides the CLI start-up.

Prints medians and the ratio vtpmctl / the swtpm-side command (below 1 is faster).

    bench/bench_bundles.py [--rounds N] [--smoke] [--json FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchlib import (  # noqa: E402
    BenchError,
    exit_main,
    fill_nv,
    machine,
    median,
    timed_run,
    workdir,
)

from vtpmctl.store.blob import AesKey  # noqa: E402
from vtpmctl.store.bundle import Source, build_bundle, open_bundle  # noqa: E402

VTPMCTL = str(Path(sys.executable).with_name("vtpmctl"))
MKEY = hashlib.sha256(b"bench migration key").digest()


def shell(cmd: str, env: dict[str, str] | None = None) -> float:
    return timed_run(["bash", "-o", "pipefail", "-c", cmd], env)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Swtpm:
    """A real ``swtpm socket`` on a state dir (not initialised: waits for CMD_INIT)."""

    def __init__(self, state: Path, ctrl: Path) -> None:
        self.ctrl = ctrl
        self.proc = subprocess.Popen(
            [
                "swtpm",
                "socket",
                "--tpm2",
                "--tpmstate",
                f"dir={state}",
                "--ctrl",
                f"type=unixio,path={ctrl}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while not ctrl.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BenchError("swtpm did not start")
            time.sleep(0.01)

    def ioctl(self, *args: str) -> float:
        return timed_run(["swtpm_ioctl", "--unix", str(self.ctrl), *args])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def alternate(rounds: int, *fns: Callable[[int], float]) -> list[tuple[list[float], list[float]]]:
    """A B C A B C …: each function once per round, in order; (wall, CPU) per function.

    CPU is user + system time of the processes the step ran (and their children),
    which a busy machine inflates far less than wall time. A server's own work
    (swtpm answering swtpm_ioctl) is not in it.
    """
    out: list[tuple[list[float], list[float]]] = [([], []) for _ in fns]
    for i in range(rounds):
        for (wall, cpu), fn in zip(out, fns, strict=True):
            before = children_cpu()
            wall.append(fn(i))
            cpu.append(children_cpu() - before)
    return out


def check_tools(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not installed")


def time_parts(state: Path, rounds: int, reps: int) -> dict[str, float]:
    """Median seconds of the parts of an import, without the CLI's start-up."""
    from vtpmctl.store.statedir import StateDir
    from vtpmctl.usecases.inspect import inspect_blobs

    plain = {"permanent": StateDir(state).load("permall") or b""}
    source = Source(
        name="vm",
        host="h",
        state="stopped",
        created="",
        vtpmctl_version="",
        libtpms_version=None,
        tpm_version="2.0",
        transport="socket",
        encrypted_at_rest=False,
    )
    key = AesKey(MKEY)
    build = [
        timed(lambda: build_bundle(plain, source, ek_json=None, migration_key=key))
        for _ in range(reps)
    ]
    data = build_bundle(plain, source, ek_json=None, migration_key=key)
    opened = [timed(lambda: open_bundle(data, key)) for _ in range(reps)]
    inspected = [
        timed(lambda: inspect_blobs(plain, tpm2=True, describe=True)) for _ in range(rounds)
    ]
    validated = [timed(lambda: inspect_blobs(plain, tpm2=True)) for _ in range(rounds)]
    return {
        "build_bundle": median(build),
        "open_bundle": median(opened),
        "validate": median(validated),
        "describe": median(inspected),
    }


Timings = tuple[list[float], list[float]]
"""Wall and CPU seconds of each round."""
Row = tuple[str, str, Timings, str, Timings, str, Timings]


def report_rows(rows: list[Row]) -> dict[str, dict[str, float]]:
    """Print one line per row (vtpmctl, a plain copy, swtpm_ioctl); their medians."""
    results: dict[str, dict[str, float]] = {}
    for label, an, a, bn, b, cn, c in rows:
        (ma, ca), (mb, cb), (mc, cc) = ((median(w), median(u)) for w, u in (a, b, c))
        print(
            f"{label:7} {an:>28} {ma * 1e3:6.0f} / {ca * 1e3:4.0f}   "
            f"{bn:>16} {mb * 1e3:5.1f} / {cb * 1e3:4.1f}  x{ma / mb:<5.0f} "
            f"{cn:>30} {mc * 1e3:5.1f} / {cc * 1e3:4.1f}  x{ma / mc:.0f}"
        )
        results[label] = {
            "vtpmctl": ma,
            "vtpmctl_cpu": ca,
            "copy": mb,
            "copy_cpu": cb,
            "swtpm_ioctl": mc,
            "swtpm_ioctl_cpu": cc,
        }
    return results


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--smoke", action="store_true", help="1 round, 4 NV indexes (a quick check)")
    p.add_argument("--json", type=Path, help="also write the results here")
    ns = p.parse_args()
    rounds = 1 if ns.smoke else ns.rounds
    check_tools("swtpm", "swtpm_ioctl", "tar")

    with workdir("vbb-") as wd:
        src_home = wd / "src"
        env = dict(os.environ, VTPMCTL_HOME=str(src_home))
        env.pop("NOTIFY_SOCKET", None)

        def vt(*args: str, home: Path = src_home) -> float:
            return timed_run([VTPMCTL, *args], dict(env, VTPMCTL_HOME=str(home)))

        key_file = wd / "mig.key"
        key_file.write_bytes(MKEY.hex().encode() + b"\n")
        key_file.chmod(0o600)
        vt("create", "vm")
        vt("start", "vm")
        vt("ctl", "vm", "init")
        indexes = fill_nv(src_home / "run" / "vm" / "tpm", 4 if ns.smoke else None)
        vt("stop", "vm")
        state = src_home / "lib" / "instances" / "vm" / "tpmstate"
        permall = (state / "tpm2-00.permall").stat().st_size

        # swtpm on copies of the same state: the source saves, the destination loads.
        sw_src_state, sw_dst_state = wd / "sw-src", wd / "sw-dst"
        shutil.copytree(state, sw_src_state)
        shutil.copytree(state, sw_dst_state)
        for lock in (sw_src_state / ".lock", sw_dst_state / ".lock"):
            lock.unlink(missing_ok=True)
        sw_src = Swtpm(sw_src_state, wd / "sws.ctrl")
        sw_dst = Swtpm(sw_dst_state, wd / "swd.ctrl")
        results: dict[str, dict[str, float]] = {}
        try:
            sw_src.ioctl("-i")
            bundle = wd / "vm.bundle"
            keyed = wd / "vmk.bundle"
            blob = wd / "permanent.blob"

            def vt_export(i: int) -> float:
                return vt("migrate", "export", "vm", "-o", str(bundle))

            def cp_out(i: int) -> float:
                out = wd / f"cp-{i}"
                took = timed_run(["cp", "-a", str(state), str(out)])
                shutil.rmtree(out)
                return took

            def sw_save(i: int) -> float:
                return sw_src.ioctl("--save", "permanent", str(blob))

            exp = alternate(rounds, vt_export, cp_out, sw_save)

            def vt_import(i: int) -> float:
                home = wd / f"dst-{i}"
                took = vt("migrate", "import", str(bundle), home=home)
                shutil.rmtree(home)
                return took

            def cp_in(i: int) -> float:
                target = wd / f"back-{i}"
                took = shell(f"rm -rf {target} && cp -a {state} {target}")
                shutil.rmtree(target)
                return took

            def sw_load(i: int) -> float:
                start = time.perf_counter()
                sw_dst.ioctl("--stop")
                sw_dst.ioctl("--load", "permanent", str(blob))
                sw_dst.ioctl("-i")
                return time.perf_counter() - start

            imp = alternate(rounds, vt_import, cp_in, sw_load)

            def vt_pipe(i: int) -> float:
                home = wd / f"pipe-{i}"
                took = shell(
                    f"VTPMCTL_HOME={src_home} {VTPMCTL} migrate export vm - | "
                    f"VTPMCTL_HOME={home} {VTPMCTL} migrate import -",
                    env,
                )
                shutil.rmtree(home)
                return took

            def tar_pipe(i: int) -> float:
                target = wd / f"tar-{i}"
                target.mkdir()
                took = shell(f"tar -C {state} -c . | tar -C {target} -x")
                shutil.rmtree(target)
                return took

            def sw_pipe(i: int) -> float:
                start = time.perf_counter()
                sw_src.ioctl("--save", "permanent", str(blob))
                sw_dst.ioctl("--stop")
                sw_dst.ioctl("--load", "permanent", str(blob))
                sw_dst.ioctl("-i")
                return time.perf_counter() - start

            pipe = alternate(rounds, vt_pipe, tar_pipe, sw_pipe)

            def vt_export_keyed(i: int) -> float:
                return vt(
                    "migrate",
                    "export",
                    "vm",
                    "-o",
                    str(keyed),
                    "--migration-key-file",
                    str(key_file),
                )

            def vt_import_keyed(i: int) -> float:
                home = wd / f"dstk-{i}"
                took = vt(
                    "migrate",
                    "import",
                    str(keyed),
                    "--migration-key-file",
                    str(key_file),
                    home=home,
                )
                shutil.rmtree(home)
                return took

            (kexp, _), (kimp, _) = alternate(rounds, vt_export_keyed, vt_import_keyed)
            sizes = {
                "bundle": bundle.stat().st_size,
                "keyed": keyed.stat().st_size,
                "swtpm_ioctl": blob.stat().st_size,
            }
        finally:
            sw_src.stop()
            sw_dst.stop()

        parts = time_parts(state, rounds, 5 if ns.smoke else 50)

    rows: list[Row] = [
        (
            "export",
            "vtpmctl migrate export -o F",
            exp[0],
            "cp -a state dir",
            exp[1],
            "swtpm_ioctl --save permanent",
            exp[2],
        ),
        (
            "import",
            "vtpmctl migrate import F",
            imp[0],
            "cp -a state dir",
            imp[1],
            "swtpm_ioctl --stop/--load/-i",
            imp[2],
        ),
        (
            "pipe",
            "export - | import -",
            pipe[0],
            "tar c | tar x",
            pipe[1],
            "--save, then --stop/--load/-i",
            pipe[2],
        ),
    ]
    print(
        f"Migration bundles, full NV: {indexes} x 2 KiB indexes, permall {permall} bytes, "
        f"bundle {sizes['bundle']} bytes (keyed {sizes['keyed']}, swtpm_ioctl blob "
        f"{sizes['swtpm_ioctl']}); {rounds} rounds; {machine()}"
    )
    print("medians, wall / CPU ms; ratio = vtpmctl / the other (wall)")
    results.update(report_rows(rows))
    print(
        f"keyed   export {median(kexp) * 1e3:.1f} ms, import {median(kimp) * 1e3:.1f} ms "
        "(migration key: AES-256-CBC + HMAC)"
    )
    print(
        f"parts   build_bundle {parts['build_bundle'] * 1e3:.2f} ms, open_bundle "
        f"{parts['open_bundle'] * 1e3:.2f} ms (in process, keyed); inspect_blobs: ValidateState "
        f"{parts['validate'] * 1e3:.0f} ms, + power-on and listing "
        f"{parts['describe'] * 1e3:.0f} ms (fresh process)"
    )
    results["keyed"] = {"export": median(kexp), "import": median(kimp)}
    results["parts"] = parts
    if ns.json is not None:
        ns.json.write_text(
            json.dumps(
                {
                    "nv_indexes": indexes,
                    "permall_bytes": permall,
                    "sizes": sizes,
                    "rounds": rounds,
                    "machine": machine(),
                    "results": results,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    exit_main(main, "bench_bundles")
