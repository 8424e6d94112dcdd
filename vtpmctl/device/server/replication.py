"""The daemon's side of a remote: keep the lease, push the permanent state after changes.

Loaded only by a daemon started with ``--remote-spec`` (``vtpmctl start`` of
an instance bound to a remote): a daemon without one imports neither this
module, boto3 nor a thread more.

One thread does every write to the remote, so the lease's ETag has one
owner. It sleeps until the permanent state changes (``WatchedStateDir``
wakes it: an Event set after the state file's durable write, nothing more on
the TPM's path) or a renewal is due. A change is pushed at once if the last
push is at least ``interval`` old, else when it is: at most one push per
interval, so a host that dies loses at most about one interval of NV
changes. A push uploads the state file as stored (encrypted with the
instance's key if it is) as an object named by the SHA-256 of its plaintext,
then points the lease at it with a conditional write that also renews the
lease: the push that lost the lease changes nothing the new holder reads.

The remote going away stops nothing but the pushes: the TPM goes on serving,
the status file shows the lag and the error, and the next tick tries again.
A lost lease (another host took it over) ends the writes: that is logged and
shown by ``status`` (with the lag growing); the TPM still serves its VM,
whose state no longer reaches the remote.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from vtpmctl import logger
from vtpmctl.errors import LeaseLost, RemoteError, StoreError
from vtpmctl.model import BlobKind
from vtpmctl.store.blob import AesKey, unwrap_file
from vtpmctl.store.lease import Held, Lease, Replica, now_ms
from vtpmctl.store.replication import DaemonSpec, ReplicationStatus
from vtpmctl.store.statedir import StateDir

if TYPE_CHECKING:
    from collections.abc import Callable

    from vtpmctl.store.remote.client import RemoteClient

log = logger.get("vtpmctl.replication")

_PERMALL = BlobKind.PERMANENT.file_name
# Seconds the daemon's exit waits for its last push and release, in all: well inside
# the 10 s `vtpmctl stop` gives a daemon to end.
FINAL_PUSH_TIMEOUT = 4.0


class WatchedStateDir(StateDir):
    """A StateDir that calls ``on_permanent`` after each durable write of the permanent state."""

    on_permanent: Callable[[], None] | None = None

    def store(self, name: str, plain: bytes) -> None:
        super().store(name, plain)
        if name == _PERMALL and self.on_permanent is not None:
            self.on_permanent()


def _client(spec: DaemonSpec) -> RemoteClient:
    from vtpmctl.store.remote.client import RemoteClient

    return RemoteClient(spec.remote)


class Replicator:
    """Keeps one instance's lease and replicates its permanent state (see the module doc)."""

    def __init__(
        self,
        spec: DaemonSpec,
        statedir: StateDir,
        key: AesKey | None,
        client_factory: Callable[[DaemonSpec], RemoteClient] = _client,
    ) -> None:
        self.spec = spec
        self.statedir = statedir
        self.key = key
        self._client_factory = client_factory
        self._lease: Lease | None = None
        self.held: Held = spec.held
        self.interval = spec.interval_ms / 1000
        self.renew_every = spec.renew_ms / 1000
        self.lease_s = spec.lease_ms / 1000
        self._cond = threading.Condition()
        self._changes = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        replica = spec.lease.replica
        self.status = ReplicationStatus(
            remote=spec.remote.name,
            holder=spec.lease.holder,
            generation=spec.lease.generation,
            lease_expires_ms=spec.lease.expires_ms,
            replicate=spec.replicate,
            pushed_seq=replica.seq if replica is not None else 0,
            pushed_sha256=replica.sha256 if replica is not None else None,
            last_push_ms=replica.pushed_ms if replica is not None else None,
        )
        self._last_attempt = 0.0  # monotonic time of the last push attempt
        self._remote_down = False

    # ------------------------------------------------------------ from the TPM's side

    def changed(self) -> None:
        """The permanent state was written: wake the thread (cheap: under the engine lock)."""
        with self._cond:
            self._changes += 1
            if self.status.pending_since_ms is None:
                self.status.pending_since_ms = now_ms()
            self._cond.notify()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Look for unpushed state (a crash of this host), write the status, start the thread."""
        if self.spec.replicate and self._local_digest() != self.status.pushed_sha256:
            self.changed()
        self._write_status()
        self._thread = threading.Thread(target=self._run, name="replication", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """At the daemon's end: push what is pending, then release the lease (bounded in time)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        deadline = time.monotonic() + FINAL_PUSH_TIMEOUT
        if self._thread is not None:
            self._thread.join(FINAL_PUSH_TIMEOUT / 2)
            if self._thread.is_alive():  # stuck in a request: the remote does not answer
                self._remote_down = True
        if self.status.lease_lost or self._remote_down:
            self._write_status()
            return  # nothing to release, or nobody to release it to: it expires
        done = threading.Thread(target=self._finish, name="replication-end", daemon=True)
        done.start()
        done.join(max(deadline - time.monotonic(), 0.1))
        if done.is_alive():
            log.warning("no answer from the remote in %.0fs; the lease expires", FINAL_PUSH_TIMEOUT)

    def _finish(self) -> None:
        try:
            if self.spec.replicate and self.status.pending_since_ms is not None:
                self._push()
            lease = self._get_lease()
            if lease.release(self.held) is None:
                log.warning("the lease was taken by another host before it was released")
            else:
                self.status.lease_expires_ms = 0
                log.info("released the lease of %s", self.spec.instance)
        except (RemoteError, StoreError, LeaseLost) as exc:
            self._failed(exc)
        self._write_status()

    # ------------------------------------------------------------ the thread

    def _get_lease(self) -> Lease:
        if self._lease is None:
            self._lease = Lease(
                self._client_factory(self.spec),
                self.spec.lease_key,
                self.spec.lease.holder,
                self.spec.instance,
            )
        return self._lease

    def _run(self) -> None:
        next_renew = time.monotonic() + self.renew_every
        while True:
            with self._cond:
                seen = self._changes
                while not self._stopping:
                    if self.status.lease_lost:  # only the lag to report, once per interval
                        if self._changes != seen:
                            break
                        self._cond.wait()
                        continue
                    now = time.monotonic()
                    due = [next_renew]
                    if self.spec.replicate and self.status.pending_since_ms is not None:
                        due.append(self._last_attempt + self.interval)
                    wait = min(due) - now
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                if self._stopping:
                    return
            if self.status.lease_lost:
                self._write_status()
                time.sleep(self.interval)
                continue
            pending = self.spec.replicate and self.status.pending_since_ms is not None
            try:
                if pending and time.monotonic() >= self._last_attempt + self.interval:
                    self._push()
                else:
                    self._renew()
                next_renew = time.monotonic() + self.renew_every
                self._recovered()
            except LeaseLost as exc:
                self._failed(exc)
                self.status.lease_lost = True
            except (RemoteError, StoreError) as exc:
                self._failed(exc)
                # Try again soon, but not in a tight loop.
                next_renew = time.monotonic() + min(self.renew_every, max(self.interval, 1.0))
            self._write_status()

    def _renew(self) -> None:
        self.held = self._get_lease().renew(self.held, self.lease_s)
        self.status.lease_expires_ms = self.held.record.expires_ms

    def _local(self) -> tuple[bytes, str] | None:
        raw = self.statedir.read_raw(_PERMALL)
        if raw is None:
            return None
        return raw, hashlib.sha256(unwrap_file(raw, self.key)).hexdigest()

    def _local_digest(self) -> str | None:
        try:
            found = self._local()
        except StoreError:
            return None
        return None if found is None else found[1]

    def _push(self) -> None:
        """Upload the state file as it is now and point the lease at it (fenced)."""
        self._last_attempt = time.monotonic()
        with self._cond:
            seen = self._changes
            read_at = now_ms()
        found = self._local()
        if found is None:
            return
        raw, digest = found
        lease = self._get_lease()
        if digest != self.status.pushed_sha256:
            key = self.spec.objects_prefix + digest
            lease.client.put(key, raw)
            seq = self.status.pushed_seq + 1
            replica = Replica(key, digest, len(raw), seq, now_ms(), self.held.record.generation)
            self.held = lease.renew(self.held, self.lease_s, replica)
            self.status.pushed_seq = seq
            self.status.pushed_sha256 = digest
            self.status.last_push_ms = replica.pushed_ms
        self.status.lease_expires_ms = self.held.record.expires_ms
        with self._cond:
            if self._changes == seen:
                self.status.pending_since_ms = None
            else:  # changed while it was pushed: what came after the read is pending
                self.status.pending_since_ms = read_at

    # ------------------------------------------------------------ reporting

    def _failed(self, exc: Exception) -> None:
        message = " ".join(str(exc).split())
        if message != self.status.last_error:
            log.error("%s", message)
        self.status.last_error = message
        self._remote_down = not isinstance(exc, LeaseLost)

    def _recovered(self) -> None:
        if self.status.last_error is not None:
            log.info("the remote answers again")
        self.status.last_error = None
        self._remote_down = False

    def _write_status(self) -> None:
        self.status.updated_ms = now_ms()
        try:
            self.status.write(Path(self.spec.status_file))
        except OSError as exc:
            log.warning("cannot write %s: %s", self.spec.status_file, exc.strerror)


def load(spec_file: str) -> DaemonSpec:
    """The spec ``vtpmctl start`` wrote for this daemon."""
    return DaemonSpec.read(Path(spec_file))
