"""Remotes: add and remove them, list what they hold, push and pull instances.

``add_remote`` checks the remote before recording anything here: the bucket
must exist and the credentials must list it, and the fleet key must be the
one ``fleet.json`` names (a new remote gets a ``fleet.json`` for the key
given, or for a new random key). The object layout is ``store.remote.layout``;
every S3 call goes through ``store.remote.client.RemoteClient``.

API (stable; the lease and replication code builds on it):
``open_remote(name|None) -> Session`` (remote, client, fleet key),
``add_remote``, ``remove_remote``, ``list_remote``, ``push``, ``pull``,
``rotate_fleet_key``, ``collect_garbage``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from vtpmctl.errors import RemoteError, VtpmctlError
from vtpmctl.store.blob import AesKey
from vtpmctl.store.instances import InstancePaths
from vtpmctl.store.keys import generate_key, key_fingerprint
from vtpmctl.store.paths import Roots
from vtpmctl.store.remote.client import RemoteClient, RemoteConflict
from vtpmctl.store.remote.config import (
    Remote,
    RemoteConfigError,
    RemoteRegistry,
    parse_url,
    validate_remote_name,
)
from vtpmctl.store.remote.layout import (
    InstanceKeys,
    RemoteDataError,
    RemoteIndex,
    classify,
    drop_wraps,
    fleet_key_name,
    fleet_record,
    index_name,
    instances_prefix,
    key_name,
    key_record,
    keyid_of,
    lease_name,
    object_name,
    objects_prefix,
    open_index,
    open_key_record,
    peek_index,
    read_fleet_record,
    wrapped_with,
)

T = TypeVar("T")

# Progress of a transfer: (bytes done, bytes in all); called from the transferring thread.
Progress = Callable[[int, int], None]

# A push uploads again an object it would reuse that no index names and that is older
# than this (s): `remote gc` deletes only such objects older than its --older-than.
REVIVE_AGE = 3600


@dataclass
class Session:
    """A configured remote with its client and this host's fleet key."""

    remote: Remote
    client: RemoteClient
    fleet_key: AesKey


def open_remote(name: str | None, roots: Roots | None = None) -> Session:
    """The remote NAME (or the only one), its client and fleet key; nothing is fetched yet."""
    registry = RemoteRegistry(roots)
    remote = registry.resolve(name)
    fleet_key = registry.fleet_key(remote)
    return Session(remote, RemoteClient(remote), fleet_key)


@dataclass
class Added:
    remote: Remote
    fleet: str  # "joined": the remote had this fleet key; "created": fleet.json written now
    generated_key: bool  # no key was given: a new one was made (copy it to the other hosts)
    key_path: str


def add_remote(
    name: str,
    url: str,
    *,
    endpoint: str | None = None,
    region: str | None = None,
    profile: str | None = None,
    fleet_key: AesKey | None = None,
    roots: Roots | None = None,
) -> Added:
    """Check the remote, then record it and its fleet key here (or change nothing)."""
    registry = RemoteRegistry(roots)
    validate_remote_name(name)
    bucket, prefix = parse_url(url)
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise RemoteConfigError(f"bad endpoint {endpoint!r}: give it as http(s)://HOST[:PORT]")
    if name in {r.name for r in registry.all()}:
        raise RemoteConfigError(
            f"a remote named {name} exists already; remove it first "
            f"(vtpmctl remote rm {name}) or pick another name"
        )
    probe = Remote(name, bucket, prefix, endpoint, region, profile, fleet_key="")
    client = RemoteClient(probe)
    client.check_bucket()
    fleet_where = probe.where(probe.key(fleet_key_name()))
    existing = client.get(probe.key(fleet_key_name()))
    generated = False
    if existing is not None:
        fp = read_fleet_record(existing, fleet_where)
        if fleet_key is None:
            raise RemoteConfigError(
                f"{probe.url} belongs to a fleet (key {fp}); give its fleet key with "
                "--key-file FILE or --key-fd N"
            )
        if key_fingerprint(fleet_key) != fp:
            raise RemoteConfigError(
                f"the fleet key given ({key_fingerprint(fleet_key)}) is not the fleet key of "
                f"{probe.url} ({fp}); give the key the other hosts of this remote use"
            )
        fleet = "joined"
    else:
        if fleet_key is None:
            fleet_key, generated = generate_key(256), True
        try:
            client.put(probe.key(fleet_key_name()), fleet_record(fleet_key), if_none_match=True)
        except RemoteConflict:
            raise RemoteConfigError(
                f"another host set up {probe.url} at the same time; run the command again "
                "with that host's fleet key"
            ) from None
        fleet = "created"
    remote = Remote(name, bucket, prefix, endpoint, region, profile, key_fingerprint(fleet_key))
    registry.add(remote, fleet_key)
    return Added(remote, fleet, generated, str(registry.key_path(name)))


def remove_remote(name: str, roots: Roots | None = None) -> Remote:
    """Forget the remote here; nothing in the remote is touched."""
    return RemoteRegistry(roots).remove(name)


# ---------------------------------------------------------------- transfers

WORKERS = 8  # parallel object transfers (one S3 round trip each)


def _check_fleet(session: Session) -> None:
    """The remote's fleet.json names this host's fleet key (a rotation elsewhere shows here)."""
    remote = session.remote
    key = remote.key(fleet_key_name())
    data = session.client.get(key)
    if data is None:
        raise RemoteDataError(
            f"{remote.where(key)} is missing: {remote.url} is not set up as a vtpmctl remote "
            f"(or was emptied); add it again: vtpmctl remote rm {remote.name} && "
            f"vtpmctl remote add {remote.name} {remote.url} --key-file FLEETKEY"
        )
    fp = read_fleet_record(data, remote.where(key))
    if fp != remote.fleet_key:
        raise RemoteConfigError(
            f"{remote.url} now uses fleet key {fp}, not this host's {remote.fleet_key} (it was "
            f"rotated); get the new key and add the remote again: vtpmctl remote rm "
            f"{remote.name} && vtpmctl remote add {remote.name} {remote.url} --key-file NEWKEY"
        )


def _transfer(jobs: list[tuple[int, Callable[[], T]]], progress: Progress | None) -> list[T]:
    """Run ``jobs`` ((bytes, call) pairs) on a few threads; the first error is raised."""
    from concurrent.futures import ThreadPoolExecutor

    total = sum(size for size, _ in jobs)
    done = 0
    results: list[T] = []
    if progress is not None:
        progress(0, total)
    if not jobs:
        return results
    with ThreadPoolExecutor(max_workers=min(WORKERS, len(jobs))) as pool:
        futures = [(size, pool.submit(call)) for size, call in jobs]
        try:
            for size, future in futures:
                results.append(future.result())
                done += size
                if progress is not None:
                    progress(done, total)
        except BaseException:
            for _, future in futures:
                future.cancel()
            raise
    return results


@dataclass
class Pushed:
    name: str
    remote: Remote
    generation: int
    source_state: str
    objects: int  # objects the index names
    uploaded: int  # objects uploaded now (the others were in the remote already)
    uploaded_bytes: int  # of objects; the index (and a new key object) come on top
    index_bytes: int
    size: int  # bytes of every object the index names
    snapshots: int
    notes: list[str]


def _instance_keys(session: Session, name: str, state_key: AesKey | None) -> InstanceKeys:
    """The instance's key object in the remote, made (wrapped with the fleet key) if new."""
    keyid = keyid_of(state_key)
    key = session.remote.key(key_name(name, keyid))
    where = session.remote.where(key)
    for _ in range(3):
        data = session.client.get(key)
        if data is not None:
            keys = open_key_record(data, session.fleet_key, name, keyid, where)
            if keys.state_key != state_key:
                raise RemoteDataError(f"{where} holds another key than {name}'s; it was altered")
            return keys
        keys = InstanceKeys.new(state_key)
        try:
            session.client.put(key, key_record([session.fleet_key], keys, name), if_none_match=True)
            return keys
        except RemoteConflict:
            continue  # another push made it first: use that one
    raise RemoteError(f"{where} keeps changing; try again")


def push(
    name: str,
    remote_name: str | None = None,
    *,
    allow_plaintext: bool = False,
    progress: Progress | None = None,
    roots: Roots | None = None,
) -> Pushed:
    """Upload NAME: the objects the remote lacks, then its index (a reader sees old or new)."""
    import socket

    from vtpmctl import __version__
    from vtpmctl.store.blob import wrap_file
    from vtpmctl.store.instance_keys import load_state_key
    from vtpmctl.store.instances import Registry, now_utc
    from vtpmctl.store.keys import KeyFileError
    from vtpmctl.store.snapshots import SnapshotError, SnapshotStore, snapshots_dir
    from vtpmctl.usecases.migrate import ek_json_of, read_plain_state

    registry = Registry(roots)
    inst = registry.get(name)
    if not inst.config.encrypted and not allow_plaintext:
        raise RemoteError(
            f"{name} is not encrypted at rest, so its TPM state would leave this host in "
            f"plaintext; encrypt it first (vtpmctl key rotate {name} --new-key-file KEY) "
            "or push it anyway with --allow-plaintext"
        )
    session = open_remote(remote_name, roots)
    _check_fleet(session)
    from vtpmctl.usecases.ownership import push_generation

    lease_generation = push_generation(inst, session.client, session.remote)
    read = read_plain_state(registry, name, allow_running=True)
    inst = read.instance
    try:
        state_key = load_state_key(inst)
        snaps = SnapshotStore(snapshots_dir(inst.paths), state_key).export_index()
    except (KeyFileError, SnapshotError) as exc:
        raise RemoteError(f"cannot push {name}: {exc}") from None
    keyid = keyid_of(state_key)
    plain: dict[str, bytes] = {k: v for k, v in read.blobs.items() if v}
    ek_json = ek_json_of(inst)
    if ek_json is not None:
        plain["ek"] = ek_json
    digests = {kind: hashlib.sha256(data).hexdigest() for kind, data in plain.items()}
    stored: dict[str, bytes] = dict(snaps[1]) if snaps else {}
    sizes: dict[str, int] = {d: len(b) for d, b in stored.items()}
    for kind, data in plain.items():
        if digests[kind] not in stored:
            # the size of swtpm's file format is fixed by the plaintext's; bytes made on demand
            sizes[digests[kind]] = len(wrap_file(data, state_key))

    client, remote = session.client, session.remote
    old = client.get_etag(remote.key(index_name(name)))
    index_key_where = remote.where(remote.key(index_name(name)))
    generation = 1
    if old is not None:
        generation = peek_index(old[0], index_key_where).generation + 1
    keys = _instance_keys(session, name, state_key)
    listed = {
        o.key.rsplit("/", 1)[-1]: o for o in client.list(remote.key(objects_prefix(name, keyid)))
    }
    named = set(peek_index(old[0], index_key_where).objects) if old is not None else set()
    # An object no index names is gc's once old enough (`remote gc --older-than`): one
    # this push reuses is uploaded again, so that its new age keeps gc off it.
    revive_before = time.time() - REVIVE_AGE
    present = {
        d: o.size
        for d, o in listed.items()
        if d in named or o.modified is None or o.modified > revive_before
    }
    missing = sorted(d for d, size in sizes.items() if present.get(d) != size)

    def upload(digest: str) -> Callable[[], str]:
        def call() -> str:
            if digest in stored:
                data = stored[digest]
            else:
                kind = next(k for k, d in digests.items() if d == digest)
                data = wrap_file(plain[kind], state_key)
            return client.put(remote.key(object_name(name, keyid, digest)), data)

        return call

    _transfer([(sizes[d], upload(d)) for d in missing], progress)
    index = RemoteIndex(
        name=name,
        generation=generation,
        pushed=now_utc(),
        host=socket.gethostname(),
        source_state=read.state,
        vtpmctl_version=__version__,
        keyid=keyid,
        config=inst.config.to_json(),
        meta=inst.meta.to_json(),
        state={k: [digests[k], len(v)] for k, v in plain.items() if k != "ek"},
        ek=[digests["ek"], len(plain["ek"])] if "ek" in plain else None,
        snapshots=snaps[0] if snaps else None,
        objects=sizes,
        lease_generation=lease_generation,
    )
    index_key = remote.key(index_name(name))
    index_bytes = index.to_bytes(keys.mac_key)
    try:
        if old is None:
            client.put(index_key, index_bytes, if_none_match=True)
        else:
            client.put(index_key, index_bytes, if_match=old[1])
    except RemoteConflict:
        raise RemoteConflict(
            f"{remote.where(index_key)} was changed by another push while this one ran; the "
            "objects are uploaded, push again to publish them"
        ) from None
    notes = list(read.settled)
    if read.state == "running":
        notes.append(f"{name} is running: pushed a copy of its permanent state")
    return Pushed(
        name=name,
        remote=remote,
        generation=generation,
        source_state=read.state,
        objects=len(sizes),
        uploaded=len(missing),
        uploaded_bytes=sum(sizes[d] for d in missing),
        index_bytes=len(index_bytes),
        size=sum(sizes.values()),
        snapshots=len(snaps[0]["snapshots"]) if snaps else 0,
        notes=notes,
    )


# ---------------------------------------------------------------- pull


@dataclass
class Pulled:
    name: str
    remote: Remote
    source_name: str
    generation: int
    pushed: str
    host: str
    size: int
    snapshots: int
    encrypted: bool
    libtpms_version: str | None
    notes: list[str]


@dataclass
class Fetched:
    """An instance read from a remote and checked byte for byte (libtpms is the caller's)."""

    index: RemoteIndex
    keys: InstanceKeys
    plain: dict[str, bytes]  # kind -> plaintext, "ek" for ek.json
    stored: dict[str, bytes]  # digest -> object bytes as stored (snapshot objects)


def fetch(session: Session, name: str, progress: Progress | None = None) -> Fetched:
    """Download and check everything the index of NAME names: MAC, sizes, HMACs, hashes."""
    from vtpmctl.store.blob import BlobError, unwrap_file

    client, remote = session.client, session.remote
    index_key = remote.key(index_name(name))
    data = client.get(index_key)
    if data is None:
        raise RemoteDataError(
            f"there is no instance {name} in {remote.url} ({remote.where(index_key)} is "
            f"missing); see vtpmctl remote ls {remote.name}"
        )
    where = remote.where(index_key)
    peek = peek_index(data, where)
    kkey = remote.key(key_name(name, peek.keyid))
    kdata = client.get(kkey)
    if kdata is None:
        raise RemoteDataError(
            f"{remote.where(kkey)}, the key object of {name}, is missing; push {name} again "
            "from a host that has it"
        )
    keys = open_key_record(kdata, session.fleet_key, name, peek.keyid, remote.where(kkey))
    index = open_index(data, keys.mac_key, where)
    if index.name != name:
        raise RemoteDataError(f"{where} describes instance {index.name!r}, not {name}")

    def download(digest: str) -> Callable[[], tuple[str, bytes, bytes]]:
        key = remote.key(object_name(name, index.keyid, digest))

        def call() -> tuple[str, bytes, bytes]:
            body = client.get(key)
            if body is None:
                raise RemoteDataError(
                    f"{remote.where(key)} is missing (the index of {name} names it); push "
                    f"{name} again from a host that has it"
                )
            if len(body) != index.objects[digest]:
                raise RemoteDataError(
                    f"{remote.where(key)} is truncated or altered: {len(body)} bytes, the index "
                    f"says {index.objects[digest]}; push {name} again from a host that has it"
                )
            try:
                plain = unwrap_file(body, keys.state_key)
            except BlobError as exc:
                raise RemoteDataError(
                    f"{remote.where(key)} is corrupt ({exc.message}); push {name} again from "
                    "a host that has it"
                ) from None
            if hashlib.sha256(plain).hexdigest() != digest:
                raise RemoteDataError(
                    f"{remote.where(key)} is corrupt: its content does not match its name; "
                    f"push {name} again from a host that has it"
                )
            return digest, body, plain

        return call

    results = _transfer(
        [(size, download(d)) for d, size in sorted(index.objects.items())], progress
    )
    stored: dict[str, bytes] = {}
    plains: dict[str, bytes] = {}
    for digest, body, plain in results:
        stored[digest], plains[digest] = body, plain
    wanted = dict(index.state)
    if index.ek is not None:
        wanted["ek"] = index.ek
    plain_by_kind = {kind: plains[entry[0]] for kind, entry in wanted.items()}
    for kind, entry in wanted.items():
        if len(plain_by_kind[kind]) != entry[1]:
            raise RemoteDataError(f"{where}: the {kind} object has the wrong size; it was altered")
    return Fetched(index, keys, plain_by_kind, stored)


def pull(
    name: str,
    remote_name: str | None = None,
    *,
    new_name: str | None = None,
    progress: Progress | None = None,
    roots: Roots | None = None,
    remote: Remote | None = None,
) -> Pulled:
    """Register NAME from the remote as a bundle import would, after checking everything.

    A failure at any point leaves the store as it was (the registry's reserve/commit).
    """
    from vtpmctl.errors import InstanceExists
    from vtpmctl.model import BlobKind, Transport
    from vtpmctl.store.bundle import Source, build_bundle
    from vtpmctl.store.instances import InstanceConfig, InstanceMeta, Registry, validate_name
    from vtpmctl.store.snapshots import SnapshotError, SnapshotStore, snapshots_dir
    from vtpmctl.usecases.migrate import ImportOptions, import_bundle

    registry = Registry(roots)
    target = validate_name(new_name or name)
    if registry.paths(target).base.exists():
        raise InstanceExists(
            f"an instance named {target} exists already on this host; pull under another "
            f"name with --name NEW, or remove it first (vtpmctl rm {target})"
        )
    if remote is not None:
        registry_r = RemoteRegistry(roots)
        session = Session(remote, RemoteClient(remote), registry_r.fleet_key(remote))
    else:
        session = open_remote(remote_name, roots)
    _check_fleet(session)
    got = fetch(session, validate_name(name), progress)
    ix = got.index
    where = session.remote.where(session.remote.key(index_name(name)))
    try:
        config = InstanceConfig.from_json(ix.config, Path(where))
        meta = InstanceMeta.from_json(ix.meta, Path(where))
    except VtpmctlError as exc:
        raise RemoteDataError(f"{where}: bad config or meta ({exc})") from None
    if config.encrypted != (got.keys.state_key is not None):
        raise RemoteDataError(f"{where}: config and key object disagree about encryption")
    source = Source(
        name=ix.name,
        host=ix.host,
        state=ix.source_state,
        created=ix.pushed,
        vtpmctl_version=ix.vtpmctl_version,
        libtpms_version=meta.libtpms_version,
        tpm_version=config.tpm,
        transport=config.transport,
        encrypted_at_rest=config.encrypted,
        ek_fingerprints=meta.ek_fingerprints,
    )
    blobs = {k: v for k, v in got.plain.items() if k in tuple(BlobKind)}
    bundle = build_bundle(blobs, source, ek_json=got.plain.get("ek"), migration_key=None)
    snap_doc = ix.snapshots

    def write_snapshots(paths: InstancePaths) -> None:
        if snap_doc is None:
            return
        names = {v[0] for st in snap_doc.get("states", {}).values() for v in st.values()}
        try:
            SnapshotStore(snapshots_dir(paths), got.keys.state_key).adopt(
                snap_doc, {d: got.stored[d] for d in names if d in got.stored}
            )
        except SnapshotError as exc:
            raise RemoteDataError(f"{where}: the snapshots cannot be used ({exc})") from None

    done = import_bundle(
        registry,
        bundle,
        ImportOptions(
            name=target,
            encrypt=config.encrypted,
            state_key=got.keys.state_key,
            key_source=meta.key_source,
            transport=Transport(config.transport),
            extra=write_snapshots,
        ),
    )
    return Pulled(
        name=target,
        remote=session.remote,
        source_name=name,
        generation=ix.generation,
        pushed=ix.pushed,
        host=ix.host,
        size=ix.size(),
        snapshots=len(snap_doc.get("snapshots", [])) if snap_doc else 0,
        encrypted=done.instance.config.encrypted,
        libtpms_version=done.libtpms_version,
        notes=done.notes,
    )


# ---------------------------------------------------------------- listing


@dataclass
class Listed:
    name: str
    generation: int
    pushed: str
    host: str  # the host that pushed last
    tpm: str
    encrypted: bool
    snapshots: int
    size: int
    lease: dict[str, object]  # state: none|held|released|expired|unknown, holder, expires


def _lease_summary(data: bytes | None) -> dict[str, object]:
    """What ``remote ls`` says of a lease object (the lease module owns its format)."""
    import json

    if data is None:
        return {"state": "none", "holder": None, "expires": None, "generation": None}
    try:
        doc = json.loads(data)
        holder = doc.get("holder")
        expires_ms = int(doc.get("expires_ms"))
        generation = doc.get("generation")
    except (ValueError, TypeError, AttributeError):
        return {"state": "unknown", "holder": None, "expires": None, "generation": None}
    if expires_ms == 0:
        state, expires = "released", None
    else:
        state = "held" if expires_ms > time.time() * 1000 else "expired"
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires_ms / 1000))
    return {"state": state, "holder": holder, "expires": expires, "generation": generation}


def list_remote(
    remote_name: str | None = None, roots: Roots | None = None
) -> tuple[Remote, list[Listed]]:
    """The instances in a remote, with who pushed them last, their lease and size."""
    session = open_remote(remote_name, roots)
    client, remote = session.client, session.remote
    _check_fleet(session)
    base = remote.key(instances_prefix())
    names = sorted(
        o.key[len(base) : -len("/index.json")]
        for o in client.list(base)
        if o.key.endswith("/index.json") and o.key.count("/") == base.count("/") + 1
    )

    def one(name: str) -> Callable[[], Listed | None]:
        def call() -> Listed | None:
            key = remote.key(index_name(name))
            data = client.get(key)
            if data is None:
                return None
            ix = peek_index(data, remote.where(key))
            lease = _lease_summary(client.get(remote.key(lease_name(name))))
            return Listed(
                name=name,
                generation=ix.generation,
                pushed=ix.pushed,
                host=ix.host,
                tpm=str(ix.config.get("tpm")),
                encrypted=ix.keyid != "plain",
                snapshots=len((ix.snapshots or {}).get("snapshots", [])),
                size=ix.size(),
                lease=lease,
            )

        return call

    found = _transfer([(1, one(n)) for n in names], None)
    return remote, [x for x in found if isinstance(x, Listed)]


# ---------------------------------------------------------------- fleet key rotation


@dataclass
class Rotated:
    remote: Remote
    old: str  # fingerprints
    new: str
    key_objects: int  # key objects in the remote, all now wrapped with the new key only


def _key_objects(session: Session) -> list[tuple[str, str, str]]:
    """(object key, instance name, keyid) of every key object in the remote."""
    base = session.remote.key(instances_prefix())
    found = []
    for o in session.client.list(base):
        parts = o.key[len(base) :].split("/")
        if len(parts) == 3 and parts[1] == "keys" and parts[2].endswith(".json"):
            found.append((o.key, parts[0], parts[2][: -len(".json")]))
    return found


def _rewrite(session: Session, key: str, change: Callable[[bytes], bytes | None]) -> bool:
    """Apply ``change`` to one object with If-Match, again if another host wrote it meanwhile."""
    for _ in range(5):
        found = session.client.get_etag(key)
        if found is None:
            return False
        new = change(found[0])
        if new is None:
            return False
        try:
            session.client.put(key, new, if_match=found[1])
            return True
        except RemoteConflict:
            continue
    raise RemoteError(f"{session.remote.where(key)} keeps changing; run the rotation again")


def rotate_fleet_key(name: str, new_key: AesKey, roots: Roots | None = None) -> Rotated:
    """Re-wrap every instance key of remote NAME under ``new_key``; nothing else is rewritten.

    1. each key object gets a wrapping under the new key beside the old one;
    2. ``fleet.json`` names the new key, and this host keeps it;
    3. the old wrappings are dropped.
    Hosts with either key can read throughout 1; after 2 the others need the new key.
    An interrupted rotation is finished by running it again with the same new key.
    """
    registry = RemoteRegistry(roots)
    session = open_remote(name, roots)
    remote, client = session.remote, session.client
    old_fp, new_fp = remote.fleet_key, key_fingerprint(new_key)
    fleet_key = remote.key(fleet_key_name())
    found = client.get_etag(fleet_key)
    if found is None:
        _check_fleet(session)  # raises: the remote is not set up
        raise AssertionError("unreachable")
    current = read_fleet_record(found[0], remote.where(fleet_key))
    if current not in (old_fp, new_fp):
        raise RemoteConfigError(
            f"{remote.url} uses fleet key {current}, neither this host's {old_fp} nor the new "
            f"{new_fp}; rotate from a host that has the current key"
        )
    objects = _key_objects(session)
    if current == old_fp and old_fp != new_fp:

        def add_wrap(obj: str, inst: str, keyid: str) -> Callable[[bytes], bytes | None]:
            def change(data: bytes) -> bytes | None:
                if new_fp in wrapped_with(data, inst, keyid):
                    return None
                keys = open_key_record(data, session.fleet_key, inst, keyid, remote.where(obj))
                return key_record([new_key], keys, inst, existing=data)

            return change

        for obj, inst, keyid in objects:
            _rewrite(session, obj, add_wrap(obj, inst, keyid))
        try:
            client.put(fleet_key, fleet_record(new_key, previous=old_fp), if_match=found[1])
        except RemoteConflict:
            raise RemoteError(
                f"{remote.where(fleet_key)} changed during the rotation; run it again"
            ) from None
        # a first push that ran meanwhile made a key object under the old key only
        objects = _key_objects(session)
        for obj, inst, keyid in objects:
            _rewrite(session, obj, add_wrap(obj, inst, keyid))
    if old_fp != new_fp:
        registry.replace_fleet_key(remote.name, new_key)

    def drop(inst: str, keyid: str) -> Callable[[bytes], bytes | None]:
        def change(data: bytes) -> bytes | None:
            if wrapped_with(data, inst, keyid) == [new_fp]:
                return None
            return drop_wraps(data, inst, keyid, keep=new_fp)

        return change

    for obj, inst, keyid in objects:
        _rewrite(session, obj, drop(inst, keyid))
    return Rotated(remote, old_fp, new_fp, len(objects))


# ---------------------------------------------------------------- garbage collection


@dataclass
class Collected:
    remote: Remote
    dry_run: bool
    older_than: int
    instances: int  # instances with an index or a lease
    objects: int  # state/snapshot objects in the remote
    live: int  # named by an index or a lease's replica
    collected: int  # unreferenced and old enough: deleted (or, dry run, would be)
    collected_bytes: int
    kept_recent: int  # unreferenced but younger than ``older_than``: kept
    kept_recent_bytes: int
    unrecognised: int  # names under instances/ vtpmctl does not write: never touched


def _live_objects(session: Session, kind: str, name: str) -> set[str]:
    """The object keys one index or lease names; RemoteDataError if it cannot be trusted."""
    from vtpmctl.store.lease import LeaseError, LeaseRecord

    client, remote = session.client, session.remote
    if kind == "lease":
        key = remote.key(lease_name(name))
        data = client.get(key)
        if data is None:
            return set()
        try:
            rec = LeaseRecord.from_bytes(data, remote.where(key))
        except LeaseError as exc:
            raise RemoteDataError(str(exc)) from None
        return set() if rec.replica is None else {rec.replica.key}
    key = remote.key(index_name(name))
    where = remote.where(key)
    data = client.get(key)
    if data is None:
        return set()  # removed since the listing: it names nothing any more
    peek = peek_index(data, where)
    kkey = remote.key(key_name(name, peek.keyid))
    kdata = client.get(kkey)
    if kdata is None:
        raise RemoteDataError(f"{remote.where(kkey)}, the key object of {name}, is missing")
    keys = open_key_record(kdata, session.fleet_key, name, peek.keyid, remote.where(kkey))
    index = open_index(data, keys.mac_key, where)
    if index.name != name:
        raise RemoteDataError(f"{where} describes instance {index.name!r}, not {name}")
    return {remote.key(object_name(name, index.keyid, d)) for d in index.objects}


def _reader(session: Session, kind: str, name: str) -> Callable[[], set[str]]:
    return lambda: _live_objects(session, kind, name)


def _deleter(client: RemoteClient, key: str) -> Callable[[], None]:
    return lambda: client.delete(key)


def collect_garbage(
    remote_name: str | None = None,
    *,
    older_than: int,
    dry_run: bool = False,
    roots: Roots | None = None,
) -> Collected:
    """Delete the objects no index or lease names any more and older than ``older_than`` s.

    Every index (its MAC checked) and lease is read before anything is deleted;
    one that cannot be read or trusted stops it all. A push uploads its objects
    before its index, so the age guard is what keeps those of a push in flight.
    """

    session = open_remote(remote_name, roots)
    client, remote = session.client, session.remote
    _check_fleet(session)
    base = remote.key(instances_prefix())
    now = time.time()
    objects = []
    records: set[tuple[str, str]] = set()
    unrecognised = 0
    for o in client.list(base):
        found = classify(o.key[len(base) :])
        if found is None:
            unrecognised += 1
        elif found[0] == "object":
            objects.append(o)
        elif found[0] in ("index", "lease"):
            records.add(found)
    try:
        named = _transfer([(1, _reader(session, k, n)) for k, n in sorted(records)], None)
    except RemoteDataError as exc:
        raise RemoteDataError(f"gc deleted nothing: {exc}") from None
    live: set[str] = set().union(*named) if named else set()
    dead = [o for o in objects if o.key not in live]
    # an object of unknown age counts as young: it may be a push's in flight
    old = [o for o in dead if o.modified is not None and now - o.modified >= older_than]
    if not dry_run:
        _transfer([(o.size, _deleter(client, o.key)) for o in old], None)
    young = [o for o in dead if o.modified is None or now - o.modified < older_than]
    return Collected(
        remote=remote,
        dry_run=dry_run,
        older_than=older_than,
        instances=len({n for _, n in records}),
        objects=len(objects),
        live=len(objects) - len(dead),
        collected=len(old),
        collected_bytes=sum(o.size for o in old),
        kept_recent=len(young),
        kept_recent_bytes=sum(o.size for o in young),
        unrecognised=unrecognised,
    )


__all__ = [
    "Added",
    "Collected",
    "Fetched",
    "Listed",
    "Progress",
    "Pulled",
    "Pushed",
    "Session",
    "add_remote",
    "collect_garbage",
    "fetch",
    "list_remote",
    "open_remote",
    "pull",
    "push",
    "remove_remote",
    "rotate_fleet_key",
]
