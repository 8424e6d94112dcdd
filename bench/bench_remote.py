#!/usr/bin/env python3
"""Remotes: push and pull next to a plain upload/download of the same bytes with boto3.

Runs against a SeaweedFS it starts on loopback (tests/interop/s3_server.py),
or against ``--endpoint URL --bucket B`` with credentials from the AWS
environment. Four parts, A B A B over ``--rounds`` (the order flips each round):

* one: one vTPM (EKs, encrypted, 3 snapshots; no EK and 1 with --smoke), whole processes:
  ``vtpmctl push vm`` into an emptied prefix vs **plain-up**, a Python process
  that uploads every file of the instance's dir with boto3 on 8 threads (what
  ``aws s3 cp --recursive`` of the dir does); the same again with nothing new
  (push uploads only its index, plain-up everything again); ``vtpmctl pull vm``
  into an empty store vs **plain-down** of the plain-up objects.
* many: ``--instances`` vTPMs (default 100; no EK, to keep the set-up short),
  in this process, so no start-up is counted: ``usecases.remote.push`` of each
  vs a plain put of each instance's files (same boto3, same client settings,
  8 threads); ``pull`` of each (which checks each state with libtpms in a
  child, as an import does) vs a plain get of each one's objects.
* dedupe: a vTPM that does not change, snapshotted and pushed 100 times
  (``--snapshots``): bytes uploaded by the pushes vs a plain copy of the
  instance dir after each snapshot.

Prints medians, ratios (vtpmctl / plain: below 1 is faster) and bytes.

    bench/bench_remote.py [--rounds N] [--instances N] [--snapshots N] [--smoke] [--json FILE]
                          [--endpoint URL --bucket B]
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
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests" / "interop"))

from benchlib import machine, median  # noqa: E402

VTPMCTL = str(Path(sys.executable).with_name("vtpmctl"))
WORKERS = 8

PLAIN = r"""
import os, sys
from concurrent.futures import ThreadPoolExecutor
import boto3
from botocore.config import Config

def client(endpoint):
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint,
        config=Config(s3={"addressing_style": "path"},
                      retries={"max_attempts": 3, "mode": "standard"},
                      request_checksum_calculation="when_required",
                      response_checksum_validation="when_required"))

def up(c, bucket, prefix, root):
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    def one(p):
        with open(p, "rb") as f:
            c.put_object(Bucket=bucket, Key=prefix + os.path.relpath(p, root), Body=f.read())
        return os.path.getsize(p)
    with ThreadPoolExecutor(8) as pool:
        return sum(pool.map(one, files))

def down(c, bucket, prefix, root):
    pages = c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    def one(k):
        data = c.get_object(Bucket=bucket, Key=k)["Body"].read()
        path = os.path.join(root, k[len(prefix):])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        return len(data)
    with ThreadPoolExecutor(8) as pool:
        return sum(pool.map(one, keys))

if __name__ == "__main__":
    mode, endpoint, bucket, prefix, root = sys.argv[1:6]
    print((up if mode == "up" else down)(client(endpoint), bucket, prefix, root))
"""


class BenchError(Exception):
    """The benchmark cannot run; the message says why."""


def run(argv: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    out = run(argv, env)
    return time.perf_counter() - start, out


def dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


@contextlib.contextmanager
def server(ns: argparse.Namespace, work: Path) -> Iterator[tuple[str, str, dict[str, str]]]:
    """(endpoint, bucket, environment with credentials)."""
    if ns.endpoint:
        if not ns.bucket:
            raise BenchError("--endpoint needs --bucket")
        yield ns.endpoint, ns.bucket, dict(os.environ)
        return
    from s3_server import s3_server

    with s3_server(work / "s3") as s3:
        yield s3.endpoint, s3.make_bucket("bench"), s3.env()


def clear(endpoint: str, bucket: str, env: dict[str, str], prefix: str) -> None:
    """Delete every object under ``prefix``."""
    c = plain_client(endpoint, env)
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            c.delete_object(Bucket=bucket, Key=obj["Key"])


def plain_client(endpoint: str, env: dict[str, str]) -> Any:
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(
        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
        region_name=env.get("AWS_DEFAULT_REGION", "us-east-1"),
    )
    return session.client(
        "s3",
        endpoint_url=endpoint,
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 3, "mode": "standard"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


def alternate(rounds: int, a: Callable[[], float], b: Callable[[], float]) -> tuple[list, list]:
    """A B, then B A, …: each side's timings."""
    ta: list[float] = []
    tb: list[float] = []
    for r in range(rounds):
        for side in ("a", "b") if r % 2 == 0 else ("b", "a"):
            (ta if side == "a" else tb).append(a() if side == "a" else b())
    return ta, tb


def row(what: str, ta: list[float], tb: list[float], unit: str = "s") -> dict[str, Any]:
    ma, mb = median(ta), median(tb)
    ratio = ma / mb if mb else 0.0
    print(f"| {what} | {ma:.3f} {unit} | {mb:.3f} {unit} | {ratio:.2f} |")
    return {"what": what, "vtpmctl": ta, "plain": tb, "ratio": ratio}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--instances", type=int, default=100)
    ap.add_argument("--snapshots", type=int, default=100)
    ap.add_argument("--smoke", action="store_true", help="1 round, 2 instances, 2 snapshots, no EK")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--endpoint", help="use this S3 endpoint (credentials: AWS environment)")
    ap.add_argument("--bucket", help="an existing bucket there (with --endpoint)")
    ns = ap.parse_args()
    if ns.smoke:
        ns.rounds, ns.instances, ns.snapshots = 1, 2, 2
    work = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    try:
        with server(ns, work) as (endpoint, bucket, env):
            results = bench(ns, work, endpoint, bucket, env)
    except BenchError as exc:
        print(f"bench_remote: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if ns.json:
        ns.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def bench(
    ns: argparse.Namespace, work: Path, endpoint: str, bucket: str, env: dict[str, str]
) -> dict[str, Any]:
    base = f"bench-{os.getpid()}"
    homes = {n: work / n for n in ("a", "b")}
    envs = {n: dict(env, VTPMCTL_HOME=str(h)) for n, h in homes.items()}
    key = work / "fleet.key"
    key.write_text(os.urandom(32).hex() + "\n")
    key.chmod(0o600)
    for n in homes:
        run([VTPMCTL, "remote", "add", "r", f"s3://{bucket}/{base}", "--endpoint", endpoint,
             "--key-file", str(key)], envs[n])  # fmt: skip
    plain = [sys.executable, "-c", PLAIN]
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"machine: {machine()}; load {' '.join(load)}; rounds {ns.rounds}")
    print("| what | vtpmctl | plain boto3 | ratio |\n|---|---|---|---|")
    results: dict[str, Any] = {"machine": machine(), "load": load, "rows": []}

    ctx = Ctx(ns, work, endpoint, bucket, env, base, homes, envs, key, plain)
    bench_one(ctx, results)
    bench_many(ctx, results)
    bench_dedupe(ctx, results)
    results["load_after"] = Path("/proc/loadavg").read_text().split()[:3]
    print(f"load after: {' '.join(results['load_after'])}")
    return results


class Ctx:
    """What every part of the benchmark uses."""

    def __init__(self, *values: Any) -> None:
        (
            self.ns,
            self.work,
            self.endpoint,
            self.bucket,
            self.env,
            self.base,
            self.homes,
            self.envs,
            self.key,
            self.plain,
        ) = values


def bench_one(ctx: Ctx, results: dict[str, Any]) -> None:
    """One instance, whole processes."""
    ns, work, endpoint, bucket, env = ctx.ns, ctx.work, ctx.endpoint, ctx.bucket, ctx.env
    base, homes, key, plain = ctx.base, ctx.homes, ctx.key, ctx.plain
    a = ctx.envs["a"]
    run([VTPMCTL, "create", "vm", "--encrypt", *(["--no-ek"] if ns.smoke else [])], a)
    for _ in range(1 if ns.smoke else 3):
        run([VTPMCTL, "snapshot", "create", "vm"], a)
    inst_dir = homes["a"] / "lib" / "instances" / "vm"
    obj_prefix = f"{base}/instances/vm/"
    plain_prefix = f"{base}-plain/vm/"

    def push_fresh() -> float:
        clear(endpoint, bucket, env, obj_prefix)
        return timed([VTPMCTL, "push", "vm", "--json"], a)[0]

    def plain_up() -> float:
        return timed([*plain, "up", endpoint, bucket, plain_prefix, str(inst_dir)], a)[0]

    ta, tb = alternate(ns.rounds, push_fresh, plain_up)
    results["rows"].append(row("1 instance: push (all new) vs upload of its dir", ta, tb))
    pushed = json.loads(run([VTPMCTL, "push", "vm", "--json"], a))
    ta, tb = alternate(ns.rounds, lambda: timed([VTPMCTL, "push", "vm"], a)[0], plain_up)
    results["rows"].append(row("1 instance: push again (nothing new) vs upload again", ta, tb))

    pull_home = work / "pull"
    pull_env = dict(env, VTPMCTL_HOME=str(pull_home))

    def pull() -> float:
        shutil.rmtree(pull_home, ignore_errors=True)
        run([VTPMCTL, "remote", "add", "r", f"s3://{bucket}/{base}", "--endpoint", endpoint,
             "--key-file", str(key)], pull_env)  # fmt: skip
        return timed([VTPMCTL, "pull", "vm"], pull_env)[0]

    def plain_down() -> float:
        target = work / "down"
        shutil.rmtree(target, ignore_errors=True)
        return timed([*plain, "down", endpoint, bucket, plain_prefix, str(target)], a)[0]

    ta, tb = alternate(ns.rounds, pull, plain_down)
    results["rows"].append(row("1 instance: pull (checked, registered) vs download", ta, tb))
    print(
        f"1 instance: {pushed['objects']} objects, {pushed['size']} bytes in the remote "
        f"(index {pushed['index_bytes']} bytes); its dir holds {dir_bytes(inst_dir)} bytes"
    )


def bench_many(ctx: Ctx, results: dict[str, Any]) -> None:
    """Many instances, in this process: the library calls, no start-up."""
    ns, work, endpoint, bucket, env = ctx.ns, ctx.work, ctx.endpoint, ctx.bucket, ctx.env
    base, homes, a = ctx.base, ctx.homes, ctx.envs["a"]
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    from concurrent.futures import ThreadPoolExecutor

    from vtpmctl.store.paths import store_roots
    from vtpmctl.usecases import remote as uc

    names = [f"i{i:03d}" for i in range(ns.instances)]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda n: run([VTPMCTL, "create", n, "--encrypt", "--no-ek"], a), names))
    roots_a = store_roots({"VTPMCTL_HOME": str(homes["a"])})
    client = plain_client(endpoint, env)
    sys.path.insert(0, str(work))
    (work / "plainlib.py").write_text(PLAIN)
    import plainlib  # type: ignore[import-not-found]

    def many_push() -> float:
        for n in names:
            clear(endpoint, bucket, env, f"{base}/instances/{n}/")
        start = time.perf_counter()
        for n in names:
            uc.push(n, "r", roots=roots_a)
        return time.perf_counter() - start

    def many_plain_up() -> float:
        start = time.perf_counter()
        for n in names:
            inst = homes["a"] / "lib" / "instances" / n
            plainlib.up(client, bucket, f"{base}-plain/{n}/", str(inst))
        return time.perf_counter() - start

    many_rounds = max(1, min(ns.rounds, 2))
    ta, tb = alternate(many_rounds, many_push, many_plain_up)
    results["rows"].append(row(f"{len(names)} instances: push vs upload (library)", ta, tb))

    def many_pull() -> float:
        shutil.rmtree(homes["b"] / "lib", ignore_errors=True)
        roots_b = store_roots({"VTPMCTL_HOME": str(homes["b"])})
        start = time.perf_counter()
        for n in names:
            uc.pull(n, "r", roots=roots_b)
        return time.perf_counter() - start

    def many_plain_down() -> float:
        target = work / "down-many"
        shutil.rmtree(target, ignore_errors=True)
        start = time.perf_counter()
        for n in names:
            plainlib.down(client, bucket, f"{base}-plain/{n}/", str(target / n))
        return time.perf_counter() - start

    ta, tb = alternate(many_rounds, many_pull, many_plain_down)
    results["rows"].append(row(f"{len(names)} instances: pull vs download (library)", ta, tb))


def bench_dedupe(ctx: Ctx, results: dict[str, Any]) -> None:
    """An unchanged vTPM, snapshotted and pushed again and again: bytes uploaded."""
    from vtpmctl.cli import run as cli_run
    from vtpmctl.store.paths import store_roots
    from vtpmctl.usecases import remote as uc

    ns, homes, a = ctx.ns, ctx.homes, ctx.envs["a"]
    roots_a = store_roots({"VTPMCTL_HOME": str(homes["a"])})
    run([VTPMCTL, "create", "still", "--encrypt", *(["--no-ek"] if ns.smoke else [])], a)
    first = uc.push("still", "r", roots=roots_a)
    still_dir = homes["a"] / "lib" / "instances" / "still"
    pushed_bytes = first.uploaded_bytes + first.index_bytes
    plain_bytes = dir_bytes(still_dir)
    os.environ["VTPMCTL_HOME"] = str(homes["a"])
    for _ in range(ns.snapshots):
        with contextlib.redirect_stdout(open(os.devnull, "w")):  # noqa: SIM115
            if cli_run(["snapshot", "create", "still"]) != 0:
                raise BenchError("snapshot create still failed")
        done = uc.push("still", "r", roots=roots_a)
        pushed_bytes += done.uploaded_bytes + done.index_bytes
        plain_bytes += dir_bytes(still_dir)
    print(
        f"dedupe: {ns.snapshots} snapshots of an unchanged vTPM, pushed after each: "
        f"{pushed_bytes} bytes uploaded by push (objects {done.size} bytes in all, last index "
        f"{done.index_bytes} bytes) vs {plain_bytes} bytes for a plain copy of its dir "
        f"each time ({plain_bytes / max(pushed_bytes, 1):.1f}x)"
    )
    results["dedupe"] = {
        "snapshots": ns.snapshots,
        "pushed_bytes": pushed_bytes,
        "plain_bytes": plain_bytes,
        "objects_bytes": done.size,
        "last_index_bytes": done.index_bytes,
    }


if __name__ == "__main__":
    sys.exit(main())
