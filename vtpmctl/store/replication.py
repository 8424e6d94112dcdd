"""Continuous replication: an instance's binding to a remote, and what its daemon reports.

Three small JSON files:

- ``Binding``, ``remote.json`` in the instance's dir (``InstancePaths.binding_file``):
  the remote the instance is bound to, whether its daemon replicates the
  permanent state, how often at most, and how long its lease lasts. Written
  by ``start --replicate``; while it exists, ``start`` takes the lease
  (store.lease).
- ``DaemonSpec``, ``replication-spec.json`` in the run dir (0600,
  ``InstancePaths.remote_spec``): what ``start`` hands the daemon it
  launches: the remote, the lease as taken, the intervals. Paths only go on
  the daemon's command line.
- ``ReplicationStatus``, ``replication.json`` in the run dir
  (``InstancePaths.replication_status``): written by the daemon after each
  push or renewal, read by ``status``.

Times are integer milliseconds since the epoch (``*_ms``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vtpmctl.errors import StoreError
from vtpmctl.store import records
from vtpmctl.store.atomic import write_atomic
from vtpmctl.store.lease import Held, LeaseRecord
from vtpmctl.store.remote.config import Remote

FORMAT_VERSION = 1
DEFAULT_INTERVAL = 5.0  # seconds: at most one push per interval
DEFAULT_LEASE = 60.0  # seconds a lease lasts without renewal
MIN_INTERVAL = 0.1


class ReplicationFileError(StoreError):
    """A binding, spec or status file is unreadable or malformed."""


def _read(cls: type[Any], path: Path) -> Any:
    def fail(what: str) -> Exception:
        return ReplicationFileError(f"{path} is malformed ({what}); remove it and start again")

    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ReplicationFileError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError:
        raise fail("not JSON") from None
    if not isinstance(doc, dict) or doc.get("format_version") != FORMAT_VERSION:
        raise fail(f"format_version is not {FORMAT_VERSION}")
    return records.from_json(cls, doc, fail)


def _write(record: Any, path: Path, mode: int) -> None:
    doc = {"format_version": FORMAT_VERSION, **records.to_json(record)}
    write_atomic(path, (json.dumps(doc, indent=1) + "\n").encode(), mode)


@dataclass
class Binding:
    """How an instance is bound to a remote (``remote.json``)."""

    remote: str
    replicate: bool = True
    interval_ms: int = int(DEFAULT_INTERVAL * 1000)  # at most one push per interval
    lease_ms: int = int(DEFAULT_LEASE * 1000)
    renew_ms: int = 0  # 0: a third of the lease

    @property
    def renew_every_ms(self) -> int:
        return self.renew_ms or max(self.lease_ms // 3, 1)

    @classmethod
    def read(cls, path: Path) -> Binding | None:
        found: Binding | None = _read(cls, path)
        return found

    def write(self, path: Path) -> None:
        _write(self, path, 0o644)


@dataclass
class DaemonSpec:
    """What the daemon needs to keep the lease and replicate (``replication-spec.json``)."""

    instance: str
    remote: Remote
    lease_key: str
    lease: LeaseRecord
    etag: str
    objects_prefix: str  # replicated states go here, named by the SHA-256 of their plaintext
    replicate: bool
    interval_ms: int
    lease_ms: int
    renew_ms: int
    status_file: str

    @property
    def held(self) -> Held:
        return Held(self.lease, self.etag)

    @classmethod
    def read(cls, path: Path) -> DaemonSpec:
        found: DaemonSpec | None = _read(cls, path)
        if found is None:
            raise ReplicationFileError(f"{path} is missing; start the instance with vtpmctl start")
        return found

    def write(self, path: Path) -> None:
        _write(self, path, 0o600)


@dataclass
class ReplicationStatus:
    """What the daemon last did with its remote (``replication.json``)."""

    remote: str
    holder: str
    generation: int
    lease_expires_ms: int
    lease_lost: bool = False
    replicate: bool = True
    pushed_seq: int = 0
    pushed_sha256: str | None = None
    last_push_ms: int | None = None
    pending_since_ms: int | None = None  # the oldest change not in the remote yet
    last_error: str | None = None
    updated_ms: int = 0

    @classmethod
    def read(cls, path: Path) -> ReplicationStatus | None:
        found: ReplicationStatus | None = _read(cls, path)
        return found

    def write(self, path: Path) -> None:
        _write(self, path, 0o644)

    def lag_seconds(self, now_ms: int) -> float:
        """How much NV history a crash now would lose: the age of the oldest unpushed change."""
        if self.pending_since_ms is None:
            return 0.0
        return max(now_ms - self.pending_since_ms, 0) / 1000
