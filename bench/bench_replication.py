#!/usr/bin/env python3
"""Replication lag under a loop of NV writes, next to a plain upload of the same bytes.

A real S3 server (SeaweedFS, as the tests start it) and one store. Two
instances run side by side, both encrypted at rest: ``bound`` is started
with ``--replicate`` (its daemon keeps a lease and pushes the permanent
state after changes, at most one push per interval) and ``plain`` is not.
For each ``--interval``, a loop writes an 8-byte NV index ``--writes``
times, one write every ``--gap`` seconds, alternating the two instances
(A B A B), and:

* times each NV write on both (the replication must stay off the TPM's
  path: the two medians should match);
* after each write on ``bound``, notes the SHA-256 of its permanent state;
  a poller reads the lease object every 20 ms and, when the replica named
  there is the state after write i, all writes up to i are in the remote:
  their **lag** is that moment minus the moment each was written;
* the baseline: ``put_object`` of the same state file's bytes with the same
  library (boto3), what a cron job copying the state dir would pay per copy.

    bench/bench_replication.py [--intervals 0.5,2] [--writes N] [--gap S] [--smoke] [--json FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchlib import BenchError, TpmData, exit_main, machine, median, workdir

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests" / "interop"))

from s3_server import S3Server  # noqa: E402

from vtpmctl.engine import tpm2 as t  # noqa: E402
from vtpmctl.engine.tpm2.rc import TpmError  # noqa: E402
from vtpmctl.store.blob import unwrap_file  # noqa: E402
from vtpmctl.store.instance_keys import load_state_key  # noqa: E402
from vtpmctl.store.instances import Registry  # noqa: E402
from vtpmctl.store.paths import store_roots  # noqa: E402
from vtpmctl.store.remote.layout import lease_name  # noqa: E402

VTPMCTL = str(Path(sys.executable).with_name("vtpmctl"))
NV_INDEX = 0x01500016
NV_ATTRS = t.NvAttr.OWNERWRITE | t.NvAttr.OWNERREAD | t.NvAttr.NO_DA


def run(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [VTPMCTL, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"vtpmctl {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def boot(env: dict[str, str], registry: Registry, name: str) -> TpmData:
    run(env, "ctl", name, "init")
    tpm = TpmData(registry.paths(name).data_socket, timeout=20)
    t.startup(tpm.transact)
    try:
        t.nv_define_space(tpm.transact, t.NvPublic(NV_INDEX, t.Alg.SHA256, NV_ATTRS, b"", 8))
    except TpmError as exc:
        if exc.rc != 0x14C:  # TPM_RC_NV_DEFINED: from the previous interval
            raise
    return tpm


def nv_write(tpm: TpmData, value: bytes) -> float:
    start = time.perf_counter()
    resp = tpm.transact(t.build_nv_write(NV_INDEX, value, auth_handle=t.RH_OWNER))
    elapsed = time.perf_counter() - start
    if resp[6:10] != b"\0\0\0\0":
        raise BenchError(f"NV write failed: {resp[6:10].hex()}")
    return elapsed


def permall_digest(registry: Registry, name: str) -> tuple[str, bytes]:
    inst = registry.get(name)
    raw = inst.statedir().read_raw("permall")
    assert raw is not None
    return hashlib.sha256(unwrap_file(raw, load_state_key(inst))).hexdigest(), raw


def one_interval(
    env: dict[str, str],
    registry: Registry,
    s3: S3Server,
    bucket: str,
    interval: float,
    writes: int,
    gap: float,
) -> dict[str, Any]:
    run(env, "stop", "bound")
    run(
        env,
        "start",
        "bound",
        "--replicate",
        "r",
        "--replicate-interval",
        str(interval),
        "--lease-duration",
        "30",
    )
    bound, plain = boot(env, registry, "bound"), boot(env, registry, "plain")
    before = json.loads(run(env, "status", "bound", "--json"))["replication"]["pushed_seq"] or 0
    client = s3.client()
    lease_key = "fleet/" + lease_name("bound")
    written: list[tuple[float, str]] = []  # (monotonic time of the write, state digest after)
    seen: dict[str, float] = {}  # digest -> when the lease first named it
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                doc = json.loads(client.get_object(Bucket=bucket, Key=lease_key)["Body"].read())
                replica = doc.get("replica")
                if replica is not None:
                    seen.setdefault(replica["sha256"], time.monotonic())
            except Exception:  # noqa: BLE001 - a poll that fails is just tried again
                pass
            time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    times: dict[str, list[float]] = {"bound": [], "plain": []}
    for i in range(writes):
        value = i.to_bytes(8, "big")
        for name, tpm in (
            (("bound", bound), ("plain", plain))
            if i % 2
            else (
                ("plain", plain),
                ("bound", bound),
            )
        ):
            times[name].append(nv_write(tpm, value))
            if name == "bound":
                written.append((time.monotonic(), permall_digest(registry, "bound")[0]))
        time.sleep(gap)
    deadline = time.monotonic() + interval + 10
    while written[-1][1] not in seen and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    poller.join(5)
    lags: list[float] = []
    pending: list[float] = []
    for at, digest in written:
        pending.append(at)
        if digest in seen:
            lags += [seen[digest] - w for w in pending if seen[digest] >= w]
            pending = []
    status = json.loads(run(env, "status", "bound", "--json"))["replication"]
    raw = permall_digest(registry, "bound")[1]
    puts = []
    for n in range(10):
        start = time.perf_counter()
        client.put_object(Bucket=bucket, Key=f"baseline/permall-{n}", Body=raw)
        puts.append(time.perf_counter() - start)
    lags.sort()
    return {
        "interval_s": interval,
        "writes": writes,
        "gap_s": gap,
        "pushes": status["pushed_seq"] - before,
        "lag_median_ms": round(median(lags) * 1000, 1) if lags else None,
        "lag_p95_ms": round(lags[int(len(lags) * 0.95) - 1] * 1000, 1) if lags else None,
        "lag_max_ms": round(lags[-1] * 1000, 1) if lags else None,
        "lagged_writes": len(lags),
        "nv_write_bound_ms": round(median(times["bound"]) * 1000, 2),
        "nv_write_plain_ms": round(median(times["plain"]) * 1000, 2),
        "plain_put_ms": round(median(puts) * 1000, 1),
        "state_bytes": len(raw),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--intervals", default="0.5,2", help="comma-separated seconds")
    p.add_argument("--writes", type=int, default=60)
    p.add_argument("--gap", type=float, default=0.1, help="seconds between NV writes")
    p.add_argument("--smoke", action="store_true", help="a few writes, one interval")
    p.add_argument("--json", type=Path)
    ns = p.parse_args(argv)
    intervals = [float(x) for x in ns.intervals.split(",")]
    writes = ns.writes
    if ns.smoke:
        intervals, writes = [0.5], 6
    results = []
    with workdir("vtpm-repl-") as root:
        s3 = S3Server(root / "s3").start()
        try:
            os.environ.update(s3.env())
            env = dict(s3.env(), VTPMCTL_HOME=str(root / "home"))
            bucket = s3.make_bucket()
            key = root / "fleet.key"
            key.write_text(os.urandom(32).hex())
            key.chmod(0o600)
            run(env, "remote", "add", "r", f"s3://{bucket}/fleet", "--endpoint", s3.endpoint,
                "--key-file", str(key))  # fmt: skip
            for name in ("bound", "plain"):
                run(env, "create", name, "--no-ek", "--encrypt")
            run(env, "start", "plain")
            registry = Registry(store_roots({"VTPMCTL_HOME": str(root / "home")}))
            try:
                for interval in intervals:
                    results.append(
                        one_interval(env, registry, s3, bucket, interval, writes, ns.gap)
                    )
            finally:
                for name in ("bound", "plain"):
                    run(env, "stop", name)
        finally:
            s3.kill()
    print(machine())
    for r in results:
        print(
            f"interval {r['interval_s']}s: {r['writes']} NV writes every {r['gap_s']}s, "
            f"{r['pushes']} pushes; lag median {r['lag_median_ms']} ms, p95 {r['lag_p95_ms']} "
            f"ms, max {r['lag_max_ms']} ms; NV write bound {r['nv_write_bound_ms']} ms / "
            f"plain {r['nv_write_plain_ms']} ms; put_object of the {r['state_bytes']}-byte "
            f"state {r['plain_put_ms']} ms; load {' '.join(r['loadavg'])}"
        )
    if ns.json:
        ns.json.write_text(json.dumps({"machine": machine(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    exit_main(main, "bench_replication")
