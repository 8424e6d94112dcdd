"""What the objects in a remote are: names, the instance index, wrapped instance keys.

Under the remote's prefix::

    fleet.json                                 which fleet key the remote's keys are wrapped with
    instances/NAME/index.json                  the instance as last pushed (written last, MACed)
    instances/NAME/keys/KEYID.json             the instance's keys, wrapped with the fleet key
    instances/NAME/objects/KEYID/SHA256        one state blob, ek.json or snapshot object
    instances/NAME/lease                       the single-owner lease (see the lease module)

KEYID is the fingerprint of the instance's state key (``plain`` for an
instance pushed with ``--allow-plaintext``). An object is named by the SHA-256
of its plaintext and holds swtpm's state-file format under the state key
(AES-CBC + HMAC), byte for byte what the local snapshot store keeps, so an
unchanged blob is uploaded once and snapshots cost what they cost locally.

**Keys (envelope encryption).** A key object holds, wrapped with AES-GCM
under the fleet key, the instance's state key (or none) and a random MAC key
that authenticates the index; the additional data binds the wrapping to the
instance name and KEYID, so key objects cannot be swapped between instances.
``wraps`` maps a fleet key fingerprint to one wrapping: a fleet key rotation
adds the new wrapping to every key object, switches ``fleet.json``, then drops
the old ones, touching nothing else; a host holding either key works
throughout.

**The index** names every object of the instance with its size, the current
state, the snapshot index, config, meta and EK data; it is canonical JSON
with an HMAC-SHA256 under the MAC key. It is written after every object it
names, so a reader sees the previous push or this one, never a mix; objects
are never overwritten with other content (their name is their content).

Nothing here does I/O: callers pass bytes in and out (``usecases.remote``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from vtpmctl.errors import RemoteError
from vtpmctl.model import BlobKind
from vtpmctl.store.blob import AesKey
from vtpmctl.store.keys import key_fingerprint

FORMAT_VERSION = 1
FLEET_FORMAT = "vtpmctl-remote"
KEY_FORMAT = "vtpmctl-remote-key"
INDEX_FORMAT = "vtpmctl-remote-index"
PLAIN = "plain"  # KEYID of an instance pushed without encryption at rest
_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEYID = re.compile(r"[0-9a-f]{16}|plain")
_AAD = b"vtpmctl remote instance key v1\x00"
_MAX_INDEX = 16 * 1024 * 1024


class RemoteDataError(RemoteError):
    """An object in the remote is missing, corrupt or not what the index says."""


def canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


# ---------------------------------------------------------------- names


def fleet_key_name() -> str:
    return "fleet.json"


def instances_prefix() -> str:
    return "instances/"


def instance_prefix(name: str) -> str:
    return f"instances/{name}/"


def index_name(name: str) -> str:
    return f"instances/{name}/index.json"


def lease_name(name: str) -> str:
    return f"instances/{name}/lease"


def key_name(name: str, keyid: str) -> str:
    return f"instances/{name}/keys/{keyid}.json"


def objects_prefix(name: str, keyid: str) -> str:
    return f"instances/{name}/objects/{keyid}/"


def object_name(name: str, keyid: str, digest: str) -> str:
    if not _HEX64.fullmatch(digest):
        raise RemoteDataError(f"bad object name {digest!r}")
    return objects_prefix(name, keyid) + digest


def classify(rel: str) -> tuple[str, str] | None:
    """(kind, instance) of a name under ``instances/``: kind is index, lease, key or object.

    None for anything vtpmctl does not write there (gc leaves those alone).
    """
    parts = rel.split("/")
    if not parts[0]:
        return None
    name = parts[0]
    if parts[1:] == ["index.json"]:
        return "index", name
    if parts[1:] == ["lease"]:
        return "lease", name
    if len(parts) == 3 and parts[1] == "keys" and parts[2].endswith(".json"):
        return "key", name
    if (
        len(parts) == 4
        and parts[1] == "objects"
        and _KEYID.fullmatch(parts[2])
        and _HEX64.fullmatch(parts[3])
    ):
        return "object", name
    return None


def keyid_of(state_key: AesKey | None) -> str:
    return PLAIN if state_key is None else key_fingerprint(state_key)


# ---------------------------------------------------------------- fleet.json


def fleet_record(fleet_key: AesKey, previous: str | None = None) -> bytes:
    return canonical(
        {
            "format": FLEET_FORMAT,
            "format_version": FORMAT_VERSION,
            "fleet_key": key_fingerprint(fleet_key),
            "previous_fleet_key": previous,
        }
    )


def read_fleet_record(data: bytes, where: str) -> str:
    """The fleet key fingerprint ``fleet.json`` names."""
    try:
        doc = json.loads(data)
        if doc.get("format") != FLEET_FORMAT:
            raise ValueError("not a vtpmctl remote")
        if doc.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {doc.get('format_version')!r}; upgrade vtpmctl")
        fp = doc["fleet_key"]
        if not isinstance(fp, str):
            raise ValueError("no fleet key fingerprint")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RemoteDataError(
            f"{where} is not a vtpmctl fleet record ({exc}); is the prefix right?"
        ) from None
    return fp


# ---------------------------------------------------------------- key objects


@dataclass
class InstanceKeys:
    """What a key object carries: the state key (None: plaintext instance) and the MAC key."""

    state_key: AesKey | None
    mac_key: bytes

    @classmethod
    def new(cls, state_key: AesKey | None) -> InstanceKeys:
        return cls(state_key, secrets.token_bytes(32))

    @property
    def keyid(self) -> str:
        return keyid_of(self.state_key)


def _aad(name: str, keyid: str) -> bytes:
    return _AAD + name.encode() + b"\x00" + keyid.encode()


def _wrap(fleet_key: AesKey, keys: InstanceKeys, name: str) -> dict[str, str]:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    payload = canonical(
        {
            "state_key": None if keys.state_key is None else keys.state_key.material.hex(),
            "mac_key": keys.mac_key.hex(),
        }
    )
    nonce = secrets.token_bytes(12)
    sealed = AESGCM(fleet_key.material).encrypt(nonce, payload, _aad(name, keys.keyid))
    return {"nonce": nonce.hex(), "sealed": sealed.hex()}


def key_record(
    fleet_keys: list[AesKey], keys: InstanceKeys, name: str, existing: bytes | None = None
) -> bytes:
    """A key object wrapping ``keys`` with each of ``fleet_keys`` (added to ``existing``'s)."""
    wraps: dict[str, Any] = {}
    if existing is not None:
        wraps.update(_parse_key_record(existing, name, keys.keyid, "the key object")["wraps"])
    for fk in fleet_keys:
        wraps[key_fingerprint(fk)] = _wrap(fk, keys, name)
    return canonical(
        {
            "format": KEY_FORMAT,
            "format_version": FORMAT_VERSION,
            "instance": name,
            "keyid": keys.keyid,
            "wraps": wraps,
        }
    )


def drop_wraps(data: bytes, name: str, keyid: str, keep: str) -> bytes:
    """The key object with only the wrapping under fleet key ``keep``."""
    doc = _parse_key_record(data, name, keyid, "the key object")
    if keep not in doc["wraps"]:
        raise RemoteDataError(f"the key object of {name} has no wrapping under fleet key {keep}")
    doc["wraps"] = {keep: doc["wraps"][keep]}
    return canonical(doc)


def wrapped_with(data: bytes, name: str, keyid: str) -> list[str]:
    """The fleet key fingerprints a key object is wrapped with."""
    return sorted(_parse_key_record(data, name, keyid, "the key object")["wraps"])


def _parse_key_record(data: bytes, name: str, keyid: str, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
        ok = (
            isinstance(doc, dict)
            and doc.get("format") == KEY_FORMAT
            and doc.get("format_version") == FORMAT_VERSION
            and doc.get("instance") == name
            and doc.get("keyid") == keyid
            and isinstance(doc.get("wraps"), dict)
        )
    except ValueError:
        ok = False
    if not ok:
        raise RemoteDataError(
            f"{where} is not the key object of instance {name} (key {keyid}); it was altered "
            "or belongs to another instance"
        )
    result: dict[str, Any] = doc
    return result


def open_key_record(
    data: bytes, fleet_key: AesKey, name: str, keyid: str, where: str
) -> InstanceKeys:
    """Unwrap a key object with the fleet key; RemoteDataError if it is not ours or forged."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    doc = _parse_key_record(data, name, keyid, where)
    fp = key_fingerprint(fleet_key)
    wrap = doc["wraps"].get(fp)
    if not isinstance(wrap, dict):
        raise RemoteDataError(
            f"{where} is wrapped with fleet key(s) {', '.join(sorted(doc['wraps']))}, not with "
            f"this host's {fp}; get the remote's current fleet key and add the remote again"
        )
    try:
        payload = AESGCM(fleet_key.material).decrypt(
            bytes.fromhex(wrap["nonce"]), bytes.fromhex(wrap["sealed"]), _aad(name, keyid)
        )
        inner = json.loads(payload)
        state = inner["state_key"]
        keys = InstanceKeys(
            None if state is None else AesKey(bytes.fromhex(state)), bytes.fromhex(inner["mac_key"])
        )
    except (InvalidTag, ValueError, KeyError, TypeError):
        raise RemoteDataError(
            f"{where} does not open with the fleet key: it was altered or corrupted"
        ) from None
    if keys.keyid != keyid or len(keys.mac_key) != 32:
        raise RemoteDataError(f"{where} holds a key other than {keyid}; it was altered")
    return keys


# ---------------------------------------------------------------- the index


@dataclass
class RemoteIndex:
    """One pushed instance; ``objects`` maps every digest it names to its stored size."""

    name: str
    generation: int
    pushed: str
    host: str
    source_state: str  # "stopped" or "running": the state is a copy of a running TPM
    vtpmctl_version: str
    keyid: str
    config: dict[str, Any]
    meta: dict[str, Any]
    state: dict[str, list[Any]]  # kind -> [digest, plaintext size]
    ek: list[Any] | None  # [digest, size] of ek.json
    snapshots: dict[str, Any] | None  # the local snapshot index (store.snapshots)
    objects: dict[str, int] = field(default_factory=dict)  # digest -> stored bytes
    lease_generation: int | None = None

    def body(self) -> dict[str, Any]:
        return {
            "format": INDEX_FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "generation": self.generation,
            "pushed": self.pushed,
            "host": self.host,
            "source_state": self.source_state,
            "vtpmctl_version": self.vtpmctl_version,
            "keyid": self.keyid,
            "config": self.config,
            "meta": self.meta,
            "state": self.state,
            "ek": self.ek,
            "snapshots": self.snapshots,
            "objects": self.objects,
            "lease_generation": self.lease_generation,
        }

    def size(self) -> int:
        return sum(self.objects.values())

    def to_bytes(self, mac_key: bytes) -> bytes:
        body = self.body()
        body["mac"] = hmac.new(mac_key, canonical(body), hashlib.sha256).hexdigest()
        return canonical(body)


def peek_index(data: bytes, where: str) -> RemoteIndex:
    """The index as written, without its MAC checked (listing, or to find the key object)."""
    if len(data) > _MAX_INDEX:
        raise RemoteDataError(f"{where} is larger than any index vtpmctl writes")
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT:
            raise ValueError("not a vtpmctl index")
        if doc.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {doc.get('format_version')!r}; upgrade vtpmctl")
        index = RemoteIndex(
            **{k: doc[k] for k in RemoteIndex.__dataclass_fields__}  # every key present
        )
        _check_index(index)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise RemoteDataError(f"{where} is not a valid instance index ({exc})") from None
    return index


def _check_index(ix: RemoteIndex) -> None:
    if not isinstance(ix.generation, int) or not _KEYID.fullmatch(str(ix.keyid)):
        raise ValueError("bad generation or keyid")
    if ix.source_state not in ("stopped", "running"):
        raise ValueError(f"bad source_state {ix.source_state!r}")
    if ix.snapshots is not None and not isinstance(ix.snapshots, dict):
        raise ValueError("snapshots must be an object")
    for what in (ix.config, ix.meta, ix.objects, ix.state):
        if not isinstance(what, dict):
            raise ValueError("config, meta, state and objects must be objects")
    for digest, size in ix.objects.items():
        if not _HEX64.fullmatch(digest) or not isinstance(size, int) or size < 0:
            raise ValueError(f"bad object entry {digest!r}")
    if BlobKind.PERMANENT not in ix.state:
        raise ValueError("no permanent state")
    entries = list(ix.state.items()) + ([("ek", ix.ek)] if ix.ek is not None else [])
    for kind, entry in entries:
        if kind != "ek" and kind not in tuple(BlobKind):
            raise ValueError(f"unknown blob kind {kind!r}")
        if (
            not isinstance(entry, list)
            or len(entry) != 2
            or entry[0] not in ix.objects
            or not isinstance(entry[1], int)
        ):
            raise ValueError(f"bad {kind} entry")


def open_index(data: bytes, mac_key: bytes, where: str) -> RemoteIndex:
    """The index, after its MAC checked out under the instance's MAC key."""
    index = peek_index(data, where)
    doc = json.loads(data)
    mac = doc.pop("mac", None)
    want = hmac.new(mac_key, canonical(doc), hashlib.sha256).hexdigest()
    if not isinstance(mac, str) or not hmac.compare_digest(mac, want):
        raise RemoteDataError(
            f"{where} fails authentication: it was altered, or pushed by a host with "
            "another fleet; push it again from a host that has the instance"
        )
    return index


__all__ = [
    "PLAIN",
    "InstanceKeys",
    "RemoteDataError",
    "RemoteIndex",
    "classify",
    "drop_wraps",
    "fleet_record",
    "index_name",
    "instance_prefix",
    "instances_prefix",
    "key_name",
    "key_record",
    "keyid_of",
    "lease_name",
    "object_name",
    "objects_prefix",
    "open_index",
    "open_key_record",
    "peek_index",
    "read_fleet_record",
    "wrapped_with",
]
