"""TPM2_GetRandom(16) round trips through a CUSE device vs the socket frontend.

Both servers are `vtpmctl serve` of this checkout, running at once: one
serves /dev/vtpm-NAME, the other a unix data socket. Each round measures the
device, then the socket (A B A B ...), with the same C client (rtcuse.c;
a Python loop if there is no cc). Servers and client share one CPU unless
--cpu -1. Prints per-round rates, medians and the device/socket ratio.

Needs /dev/cuse, so on our machines it runs in the CUSE VM:

    ../shared/cuse-vm/run-in-cuse-vm "$PWD/.venv/bin/python" bench/bench_cuse.py
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from benchlib import BenchError, exit_main

HERE = Path(__file__).resolve().parent
VTPMCTL = str(Path(sys.executable).parent / "vtpmctl")
GETRANDOM16 = bytes.fromhex("80010000000c0000017b0010")
STARTUP_CLEAR = bytes.fromhex("80010000000c000001440000")
PTM_INIT = 0xC0045001  # native-endian u32 init_flags in and result out
START_TIMEOUT = 180.0


@dataclass
class Result:
    count: int
    seconds: float
    p50_ns: float

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=5, help="A B rounds (default 5)")
    p.add_argument("--count", type=int, default=3000, help="round trips per measurement")
    p.add_argument("--warmup", type=int, default=200, help="untimed round trips first")
    p.add_argument(
        "--cpu",
        type=int,
        default=0,
        help="CPU for both servers and the client; -1 leaves them unpinned",
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--smoke", action="store_true", help="one short round: checks the script")
    ns = p.parse_args(argv)
    if ns.smoke:
        ns.rounds, ns.count, ns.warmup = 1, 100, 10
    if not 1 <= ns.rounds <= 100 or not 1 <= ns.count <= 5_000_000:
        p.error("--rounds must be 1..100 and --count 1..5000000")
    return ns


def pinned(argv: list[str], cpu: int | None) -> list[str]:
    return argv if cpu is None else ["taskset", "-c", str(cpu), *argv]


@contextlib.contextmanager
def server(argv: list[str], log: Path, ready: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A `vtpmctl serve` process, up once ``ready`` exists; SIGTERM at the end."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(
                    f"{' '.join(argv)} did not start:\n{log.read_text(errors='replace')[-2000:]}"
                )
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _read_response(read: object) -> bytes:
    assert callable(read)
    data = b""
    while len(data) < 10 or len(data) < int.from_bytes(data[2:6], "big"):
        chunk = read(4096)
        if not chunk:
            raise BenchError("the TPM closed the channel")
        data += chunk
    return data


def start_tpms(device: str, ctrl: str, data: str) -> None:
    """CMD_INIT and TPM2_Startup(CLEAR) on both servers."""
    fd = os.open(device, os.O_RDWR)
    try:
        buf = bytearray((0).to_bytes(4, sys.byteorder))
        fcntl.ioctl(fd, PTM_INIT, buf, True)
        if int.from_bytes(buf, sys.byteorder):
            raise BenchError(f"PTM_INIT on {device} failed: {buf.hex()}")
        os.write(fd, STARTUP_CLEAR)
        resp = _read_response(lambda n: os.read(fd, n))
    finally:
        os.close(fd)
    if resp[6:10] != b"\0\0\0\0":
        raise BenchError(f"TPM2_Startup on {device} failed: {resp.hex()}")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(ctrl)
        sock.sendall(b"\0\0\0\2\0\0\0\0")
        if sock.recv(4) != b"\0\0\0\0":
            raise BenchError("CMD_INIT on the socket server failed")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(data)
        sock.sendall(STARTUP_CLEAR)
        resp = _read_response(sock.recv)
    if resp[6:10] != b"\0\0\0\0":
        raise BenchError(f"TPM2_Startup on the socket server failed: {resp.hex()}")


def build_client(outdir: Path) -> Path | None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    exe = outdir / "rtcuse"
    done = subprocess.run(
        [cc, "-O2", "-o", str(exe), str(HERE / "rtcuse.c")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        print(f"bench_cuse: cc failed, using the Python client:\n{done.stderr}", file=sys.stderr)
        return None
    return exe


def run_client(
    client: Path | None, mode: str, path: str, count: int, warmup: int, cpu: int | None
) -> Result:
    if client is not None:
        out = subprocess.run(
            pinned([str(client), mode, path, str(count), str(warmup)], cpu),
            capture_output=True,
            text=True,
            timeout=3600,
        )
        if out.returncode != 0:
            raise BenchError(f"rtcuse {mode} {path}: {out.stderr.strip()}")
        n, seconds, p50, _p99 = out.stdout.split()
        return Result(int(n), float(seconds), float(p50))
    return _python_client(mode, path, count, warmup)


def _python_client(mode: str, path: str, count: int, warmup: int) -> Result:
    if mode == "dev":
        fd = os.open(path, os.O_RDWR)
        write, read, close = (
            (lambda b: os.write(fd, b)),
            (lambda n: os.read(fd, n)),
            (lambda: os.close(fd)),
        )
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(path)
        write, read, close = sock.send, sock.recv, sock.close
    try:
        lat = []
        for i in range(warmup + count):
            t0 = time.perf_counter_ns()
            write(GETRANDOM16)
            if _read_response(read)[6:10] != b"\0\0\0\0":
                raise BenchError("bad reply")
            if i >= warmup:
                lat.append(time.perf_counter_ns() - t0)
    finally:
        close()
    return Result(count, sum(lat) / 1e9, statistics.median(lat))


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    if not os.path.exists("/dev/cuse"):
        raise BenchError(
            "no /dev/cuse on this kernel; run it in the CUSE VM: "
            "../shared/cuse-vm/run-in-cuse-vm .venv/bin/python bench/bench_cuse.py"
        )
    cpu = None if ns.cpu < 0 else ns.cpu
    name = f"bench{os.getpid()}"
    device = f"/dev/vtpm-{name}"
    results: dict[str, list[Result]] = {"device": [], "socket": []}
    with tempfile.TemporaryDirectory(prefix="vb-cuse-", dir="/tmp") as tmp:
        wd = Path(tmp)
        client = build_client(wd)
        ctrl, data = str(wd / "tpm.ctrl"), str(wd / "tpm")
        cuse_argv = pinned([VTPMCTL, "serve", "--state", str(wd / "s1"), "--cuse", name], cpu)
        sock_argv = pinned(
            [
                VTPMCTL,
                "serve",
                "--state",
                str(wd / "s2"),
                "--ctrl",
                f"unix:{ctrl}",
                "--data",
                f"unix:{data}",
            ],
            cpu,
        )
        with (
            server(cuse_argv, wd / "cuse.log", Path(device)),
            server(sock_argv, wd / "socket.log", Path(data)),
        ):
            start_tpms(device, ctrl, data)
            for rnd in range(ns.rounds):
                results["device"].append(
                    run_client(client, "dev", device, ns.count, ns.warmup, cpu)
                )
                results["socket"].append(run_client(client, "unix", data, ns.count, ns.warmup, cpu))
                print(
                    f"round {rnd + 1}/{ns.rounds}: device "
                    f"{results['device'][-1].rate:8.0f}/s  socket "
                    f"{results['socket'][-1].rate:8.0f}/s",
                    flush=True,
                )
    med = {k: statistics.median(r.rate for r in v) for k, v in results.items()}
    p50 = {k: statistics.median(r.p50_ns for r in v) / 1000 for k, v in results.items()}
    per_round = [d.rate / s.rate for d, s in zip(results["device"], results["socket"], strict=True)]
    ratio = med["device"] / med["socket"]
    print()
    print(
        f"machine: {platform.machine()} {platform.release()}, {os.cpu_count()} CPUs; "
        + (f"pinned to CPU {cpu}" if cpu is not None else "unpinned")
    )
    print(
        f"client: {'C (rtcuse.c)' if client else 'Python'}; "
        f"{ns.rounds} rounds x {ns.count} round trips of TPM2_GetRandom(16)"
    )
    print(
        f"device {med['device']:8.0f}/s (p50 {p50['device']:.0f} us)  "
        f"socket {med['socket']:8.0f}/s (p50 {p50['socket']:.0f} us)  "
        f"device/socket {ratio:.2f} (rounds {min(per_round):.2f}..{max(per_round):.2f})"
    )
    if ns.json is not None:
        ns.json.write_text(
            json.dumps(
                {
                    "machine": f"{platform.machine()} {platform.release()}",
                    "cpu": cpu,
                    "client": "c" if client else "python",
                    "rounds": ns.rounds,
                    "count": ns.count,
                    "device_per_s": med["device"],
                    "socket_per_s": med["socket"],
                    "device_p50_us": p50["device"],
                    "socket_p50_us": p50["socket"],
                    "ratio": ratio,
                    "rates": {k: [r.rate for r in v] for k, v in results.items()},
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    exit_main(main, "bench_cuse")
