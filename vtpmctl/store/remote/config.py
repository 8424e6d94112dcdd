"""The remotes this host knows: ``remotes.json`` and one fleet key per remote.

``<config root>/remotes.json`` maps a remote's name to where it is (bucket,
prefix, endpoint, region, AWS profile) and the fingerprint of its fleet key.
It holds no credentials: those come from the standard AWS chain (environment,
shared config and credentials files, the profile named here) every time a
client is made, so vtpmctl never stores them. The fleet key itself is a
``format=hex`` file (0600) at ``<config root>/remotes/NAME/fleet.key``, like
an instance's state key, apart from the state tree.

API: ``parse_url``, ``Remote`` (``.key(*parts)`` builds object keys under the
prefix), ``RemoteRegistry(roots).all() / get / resolve / add / remove /
fleet_key / replace_fleet_key``, ``read_key_fd``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vtpmctl.errors import RemoteError
from vtpmctl.model import KeyFormat
from vtpmctl.store.atomic import write_atomic
from vtpmctl.store.blob import AesKey
from vtpmctl.store.dirs import CONFIG_MODE, PRIVATE_MODE, ensure_dir
from vtpmctl.store.keys import (
    KeyFileError,
    check_secret_file_mode,
    encode_hex_key,
    key_fingerprint,
    load_key,
    parse_key_bytes,
    read_bounded,
    write_secret_file,
)
from vtpmctl.store.paths import Roots, store_roots

FORMAT_VERSION = 1
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX_PART = re.compile(r"[A-Za-z0-9!_.*'()=+,:@-]+")


class RemoteConfigError(RemoteError):
    """A remote's name, URL, options or fleet key cannot be used."""


def validate_remote_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise RemoteConfigError(
            f"invalid remote name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def parse_url(url: str) -> tuple[str, str]:
    """``s3://BUCKET[/PREFIX]`` -> (bucket, prefix without slashes at either end)."""
    if not url.startswith("s3://"):
        raise RemoteConfigError(f"{url!r} is not an s3:// URL; write s3://BUCKET/PREFIX")
    bucket, _, prefix = url[5:].partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise RemoteConfigError(
            f"{bucket!r} is not a valid bucket name: 3-63 lower-case letters, digits, "
            "'.' or '-' (write s3://BUCKET/PREFIX)"
        )
    prefix = prefix.strip("/")
    parts = prefix.split("/") if prefix else []
    for part in parts:
        if part in ("", ".", "..") or not _PREFIX_PART.fullmatch(part):
            raise RemoteConfigError(
                f"bad prefix {prefix!r} in {url}: use path segments of letters, digits "
                "and -_.!*'()=+,:@, with no empty, '.' or '..' segment"
            )
    return bucket, prefix


@dataclass(frozen=True)
class Remote:
    """One remote as ``remotes.json`` records it."""

    name: str
    bucket: str
    prefix: str
    endpoint: str | None
    region: str | None
    profile: str | None
    fleet_key: str  # fingerprint of the fleet key (store.keys.key_fingerprint)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def key(self, *parts: str) -> str:
        """The object key of ``parts`` under this remote's prefix."""
        return "/".join(p for p in (self.prefix, *parts) if p)

    def where(self, key: str | None = None) -> str:
        """``s3://bucket/key`` (or the remote's URL) for messages."""
        return f"s3://{self.bucket}/{key}" if key is not None else self.url

    def to_json(self) -> dict[str, Any]:
        """The record ``remote list --json`` shows and remotes.json keeps (stable keys)."""
        return {
            "name": self.name,
            "url": self.url,
            "bucket": self.bucket,
            "prefix": self.prefix,
            "endpoint": self.endpoint,
            "region": self.region,
            "profile": self.profile,
            "fleet_key": self.fleet_key,
        }


def _remote_from_json(name: str, obj: Any, where: Path) -> Remote:
    def bad(what: str) -> RemoteConfigError:
        return RemoteConfigError(f"{where}: remote {name!r}: {what}; fix or remove the entry")

    if not isinstance(obj, dict):
        raise bad("not a JSON object")
    try:
        bucket, prefix = parse_url(str(obj.get("url")))
    except RemoteConfigError as exc:
        raise bad(str(exc)) from None
    fields: dict[str, str | None] = {}
    for key in ("endpoint", "region", "profile", "fleet_key"):
        value = obj.get(key)
        if value is not None and not isinstance(value, str):
            raise bad(f"{key} is not a string")
        fields[key] = value
    if not fields["fleet_key"]:
        raise bad("no fleet_key fingerprint")
    return Remote(
        name=name,
        bucket=bucket,
        prefix=prefix,
        endpoint=fields["endpoint"],
        region=fields["region"],
        profile=fields["profile"],
        fleet_key=str(fields["fleet_key"]),
    )


def read_key_fd(fd: int) -> AesKey:
    """A fleet key handed over on a descriptor (``--key-fd N``), read to its end."""
    try:
        data = read_bounded(fd)
    except OSError as exc:
        raise RemoteConfigError(
            f"cannot read the fleet key from descriptor {fd}: {exc.strerror}; "
            f"open it for reading (e.g. {fd}<KEYFILE)"
        ) from None
    return parse_key_bytes(data, f"the key on descriptor {fd}")


class RemoteRegistry:
    """The remotes under one config root."""

    def __init__(self, roots: Roots | None = None) -> None:
        self.roots = roots or store_roots()

    @property
    def path(self) -> Path:
        return self.roots.config / "remotes.json"

    def key_path(self, name: str) -> Path:
        return self.roots.config / "remotes" / validate_remote_name(name) / "fleet.key"

    # ------------------------------------------------------------ reading

    def _read(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not valid JSON"
            raise RemoteConfigError(
                f"cannot read {self.path}: {reason}; restore it from a backup"
            ) from None
        if not isinstance(doc, dict) or not isinstance(doc.get("remotes"), dict):
            raise RemoteConfigError(f"{self.path} is not a remotes file; restore it from a backup")
        version = doc.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise RemoteConfigError(
                f"{self.path} has format_version {version!r}, newer than this vtpmctl "
                "understands; upgrade vtpmctl"
            )
        remotes: dict[str, Any] = doc["remotes"]
        return remotes

    def all(self) -> list[Remote]:
        return [_remote_from_json(n, v, self.path) for n, v in sorted(self._read().items())]

    def get(self, name: str) -> Remote:
        entries = self._read()
        if validate_remote_name(name) not in entries:
            raise RemoteConfigError(
                f"no remote named {name}; see vtpmctl remote list, or add it with "
                f"vtpmctl remote add {name} s3://BUCKET/PREFIX --key-file FLEETKEY"
            )
        return _remote_from_json(name, entries[name], self.path)

    def resolve(self, name: str | None) -> Remote:
        """NAME, or the only remote there is when NAME is not given."""
        if name is not None:
            return self.get(name)
        remotes = self.all()
        if len(remotes) == 1:
            return remotes[0]
        if not remotes:
            raise RemoteConfigError(
                "no remote is configured; add one with "
                "vtpmctl remote add NAME s3://BUCKET/PREFIX --key-file FLEETKEY"
            )
        names = ", ".join(r.name for r in remotes)
        raise RemoteConfigError(f"several remotes are configured ({names}); name one")

    def find_url(self, bucket: str, prefix: str) -> Remote:
        """The remote whose bucket and prefix these are (``migrate import s3://…``)."""
        for remote in self.all():
            if remote.bucket == bucket and remote.prefix == prefix:
                return remote
        url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        raise RemoteConfigError(
            f"no remote is configured for {url}; add it first with "
            f"vtpmctl remote add NAME {url} --key-file FLEETKEY"
        )

    def fleet_key(self, remote: Remote) -> AesKey:
        """The remote's fleet key, private and the one remotes.json names."""
        path = self.key_path(remote.name)
        if not path.exists():
            raise RemoteConfigError(
                f"the fleet key of remote {remote.name} ({path}) is missing; restore it, or "
                f"add the remote again with its key: vtpmctl remote rm {remote.name} && "
                f"vtpmctl remote add {remote.name} {remote.url} --key-file FLEETKEY"
            )
        try:
            check_secret_file_mode(path)
            key = load_key(path, kind=KeyFormat.HEX)
        except KeyFileError as exc:
            raise RemoteConfigError(f"fleet key of remote {remote.name}: {exc}") from None
        if key_fingerprint(key) != remote.fleet_key:
            raise RemoteConfigError(
                f"{path} is not the fleet key of remote {remote.name} (fingerprint "
                f"{key_fingerprint(key)}, expected {remote.fleet_key}); restore the right key"
            )
        return key

    # ------------------------------------------------------------ writing

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """remotes.json for read-modify-write, one writer at a time."""
        ensure_dir(self.roots.config, CONFIG_MODE)
        lock = self.roots.config / ".remotes.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self._read()
        finally:
            os.close(fd)

    def _write(self, entries: dict[str, Any]) -> None:
        doc = {"format_version": FORMAT_VERSION, "remotes": entries}
        data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
        write_atomic(self.path, data, 0o600)

    def add(self, remote: Remote, fleet_key: AesKey) -> None:
        """Record ``remote`` and its fleet key; the name must be new."""
        with self._locked() as entries:
            if remote.name in entries:
                raise RemoteConfigError(
                    f"a remote named {remote.name} exists already; remove it first "
                    f"(vtpmctl remote rm {remote.name}) or pick another name"
                )
            self._store_key(remote.name, fleet_key)
            record = remote.to_json()
            entries[remote.name] = {
                k: record[k] for k in ("url", "endpoint", "region", "profile", "fleet_key")
            }
            self._write(entries)

    def replace_fleet_key(self, name: str, fleet_key: AesKey) -> Remote:
        """After a rotation: the new key file, then the new fingerprint."""
        with self._locked() as entries:
            if name not in entries:
                raise RemoteConfigError(f"no remote named {name}; see vtpmctl remote list")
            self._store_key(name, fleet_key)
            entries[name]["fleet_key"] = key_fingerprint(fleet_key)
            self._write(entries)
        return self.get(name)

    def _store_key(self, name: str, key: AesKey) -> None:
        path = self.key_path(name)
        ensure_dir(path.parent, PRIVATE_MODE, parent_mode=PRIVATE_MODE)
        write_secret_file(path, encode_hex_key(key))

    def remove(self, name: str) -> Remote:
        """Forget the remote and its fleet key here; the remote's objects are untouched."""
        with self._locked() as entries:
            if validate_remote_name(name) not in entries:
                raise RemoteConfigError(f"no remote named {name}; see vtpmctl remote list")
            remote = _remote_from_json(name, entries.pop(name), self.path)
            self._write(entries)
        shutil.rmtree(self.key_path(name).parent, ignore_errors=True)
        return remote


__all__ = [
    "Remote",
    "RemoteConfigError",
    "RemoteRegistry",
    "parse_url",
    "read_key_fd",
    "validate_remote_name",
]
