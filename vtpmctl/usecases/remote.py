"""Remotes: add and remove them, list what they hold, push and pull instances.

``add_remote`` checks the remote before recording anything here: the bucket
must exist and the credentials must list it, and the fleet key must be the
one ``fleet.json`` names (a new remote gets a ``fleet.json`` for the key
given, or for a new random key). The object layout is ``store.remote.layout``;
every S3 call goes through ``store.remote.client.RemoteClient``.

API (stable; the lease and replication code builds on it):
``open_remote(name|None) -> Session`` (remote, client, fleet key),
``add_remote``, ``remove_remote``, ``list_remote``, ``push``, ``pull``,
``rotate_fleet_key``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vtpmctl.store.blob import AesKey
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
from vtpmctl.store.remote.layout import fleet_key_name, fleet_record, read_fleet_record

# Progress of a transfer: (bytes done, bytes in all); called from the transferring thread.
Progress = Callable[[int, int], None]


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


__all__ = ["Added", "Progress", "Session", "add_remote", "open_remote", "remove_remote"]
