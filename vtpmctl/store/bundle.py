"""Migration bundles: one vTPM's state blobs plus a manifest, as a canonical tar.

A bundle is a plain ustar archive that ``tar tf`` lists, written in exactly
one way (fixed member order, mode 0600, uid/gid 0, mtime 0, no user names,
two zero blocks at the end and no record padding). Members, in this order:

``manifest.json``
    what the bundle holds (see ``Manifest``), canonical JSON;
``manifest.sum``
    ``sha256 HEX  manifest.json`` and, when the blobs are encrypted with a
    migration key, ``hmac-sha256 HEX  manifest.json`` keyed from that key;
``ek.json``
    the EK public keys and certificates recorded at create (optional);
``permanent.blob``, ``volatile.blob``, ``savestate.blob``
    the blobs that exist, in CMD_GET_STATEBLOB format (what ``swtpm_ioctl
    --save`` writes, migration-key encrypted when a key is set), so each also
    loads into a real swtpm with ``swtpm_ioctl --load``.

Reading is total: the archive is parsed, written again from the parsed names
and contents, and must equal the input byte for byte, so no header field,
padding or trailing byte escapes the content hashes, which the manifest
lists and ``manifest.sum`` covers. With a migration key the manifest is also
authenticated, so it cannot be altered without the key. This module checks
the bytes only; whether libtpms accepts the state is the importer's job.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from vtpmctl.errors import StoreError
from vtpmctl.model import BlobKind, TpmFamily, Transport
from vtpmctl.store import records
from vtpmctl.store.blob import (
    FLAG_ENCRYPTED,
    FLAG_MIGRATION_DATA,
    FLAG_MIGRATION_ENCRYPTED,
    AesKey,
    BlobError,
    parse_header,
    unwrap_transfer,
    wrap_transfer,
)

FORMAT = "vtpmctl-migration-bundle"
FORMAT_VERSION = 1
MAX_BUNDLE_SIZE = 64 * 1024 * 1024  # a full-NV TPM 2 is ~150 KiB; anything this big is not ours

MANIFEST = "manifest.json"
SUM = "manifest.sum"
EK_FILE = "ek.json"
MEMBER_ORDER = (MANIFEST, SUM, EK_FILE, *(f"{kind}.blob" for kind in BlobKind))

_BLOCK = 512
_MODE = 0o600
_MAC_CONTEXT = b"vtpmctl migration bundle manifest v1"
_HEX64 = re.compile(r"[0-9a-f]{64}")


class BundleError(StoreError):
    """The bundle is unusable; one line that says what is wrong and what to do."""


class MigrationKeyError(BundleError):
    """The bundle needs a migration key, or the one given does not open it."""


# ---------------------------------------------------------------- canonical tar


def _octal(value: int, width: int) -> bytes:
    """A NUL-terminated, zero-padded octal field, as POSIX ustar writes it."""
    digits = f"{value:o}".encode()
    if len(digits) > width - 1:
        raise BundleError(f"value {value} does not fit a {width}-byte tar field")
    return digits.rjust(width - 1, b"0") + b"\0"


def _header(name: str, size: int) -> bytes:
    raw = name.encode("ascii")
    if not raw or len(raw) > 100:
        raise BundleError(f"member name {name!r} cannot be stored in a ustar header")
    fields = [
        raw.ljust(100, b"\0"),       # name
        _octal(_MODE, 8),            # mode
        _octal(0, 8),                # uid
        _octal(0, 8),                # gid
        _octal(size, 12),            # size
        _octal(0, 12),               # mtime
        b" " * 8,                    # chksum, blank while summing
        b"0",                        # typeflag: regular file
        bytes(100),                  # linkname
        b"ustar\0", b"00",           # magic, version
        bytes(32), bytes(32),        # uname, gname
        _octal(0, 8), _octal(0, 8),  # devmajor, devminor
        bytes(155),                  # prefix
    ]  # fmt: skip
    head = b"".join(fields).ljust(_BLOCK, b"\0")
    checksum = f"{sum(head):06o}".encode() + b"\0 "
    return head[:148] + checksum + head[156:]


def write_tar(members: Iterable[tuple[str, bytes]]) -> bytes:
    """The one canonical ustar encoding of ``members`` (order kept)."""
    out = bytearray()
    for name, data in members:
        out += _header(name, len(data))
        out += data
        out += bytes(-len(data) % _BLOCK)
    out += bytes(2 * _BLOCK)
    return bytes(out)


def read_tar(data: bytes) -> list[tuple[str, bytes]]:
    """Members of a canonical tar; BundleError unless ``data`` is exactly write_tar's output."""
    if len(data) % _BLOCK:
        raise BundleError(
            f"the bundle is truncated or padded: {len(data)} bytes is not a "
            "whole number of 512-byte tar blocks"
        )
    members: list[tuple[str, bytes]] = []
    offset = 0
    while True:
        if offset + _BLOCK > len(data):
            raise BundleError(
                f"the bundle is truncated: it ends at byte {len(data)} without "
                "the tar end-of-archive blocks"
            )
        head = data[offset : offset + _BLOCK]
        if not any(head):
            break
        stored = head[148:156]
        if not re.fullmatch(rb"[0-7]{6}\0 ", stored) or int(stored[:6], 8) != sum(
            head[:148]
        ) + 8 * 32 + sum(head[156:]):
            raise BundleError(
                f"the bundle is corrupted: the tar header at byte {offset} has a bad checksum"
            )
        name = head[:100].split(b"\0", 1)[0].decode("ascii", "replace")
        size_field = head[124:136]
        if not re.fullmatch(rb"[0-7]{11}\0", size_field):
            raise BundleError(
                f"the bundle is corrupted: bad size field in the tar header at byte {offset}"
            )
        size = int(size_field[:11], 8)
        start = offset + _BLOCK
        if start + size > len(data):
            raise BundleError(
                f"the bundle is truncated: member {name!r} needs {size} bytes "
                f"at byte {start}, but the bundle ends at byte {len(data)}"
            )
        members.append((name, data[start : start + size]))
        offset = start + size + (-size % _BLOCK)
    canonical = write_tar(members)
    if canonical != data:
        where = next(
            (i for i, (a, b) in enumerate(zip(canonical, data, strict=False)) if a != b),
            min(len(canonical), len(data)),
        )
        if len(data) < len(canonical) and where == len(data):
            raise BundleError(
                f"the bundle is truncated at byte {len(data)} (its tar end blocks are incomplete)"
            )
        raise BundleError(
            f"the bundle is corrupted or was not written by vtpmctl: byte "
            f"{where} ({_locate(members, where)}) differs from the canonical "
            "form"
        )
    return members


def _locate(members: list[tuple[str, bytes]], offset: int) -> str:
    """Which part of a canonical tar holds ``offset``, for error messages."""
    pos = 0
    for name, data in members:
        if offset < pos + _BLOCK:
            return f"tar header of {name}"
        pos += _BLOCK
        end = pos + len(data) + (-len(data) % _BLOCK)
        if offset < end:
            return f"data of {name}" if offset < pos + len(data) else f"padding after {name}"
        pos = end
    return "tar end blocks" if offset < pos + 2 * _BLOCK else "bytes after the end of the tar"


# ---------------------------------------------------------------- manifest


def canonical_json(obj: dict[str, Any]) -> bytes:
    """The single byte form of a manifest (sorted keys, ASCII, two-space indent)."""
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=True) + "\n").encode()


@dataclass(frozen=True)
class MemberInfo:
    """One member the manifest lists: its name, size and SHA-256."""

    member: str
    size: int
    sha256: str


@dataclass(frozen=True)
class BlobInfo:
    """A state blob the manifest lists; ``type`` first, as manifests have it."""

    type: str = field(metadata=records.one_of(*(k.value for k in BlobKind)))
    member: str
    size: int
    sha256: str
    encrypted: bool


@dataclass
class Manifest:
    """What a bundle says about itself; every key is always present (null if unknown)."""

    created: str
    source_host: str
    source_name: str
    source_state: str = field(metadata=records.one_of("stopped", "running"))
    vtpmctl_version: str
    libtpms_version: str | None
    tpm_version: str = field(metadata=records.one_of(*(f.version for f in TpmFamily)))
    transport: str = field(metadata=records.one_of(*(t.value for t in Transport)))  # the source's
    encrypted_at_rest: bool  # the source instance's state was
    migration_key: bool  # blobs encrypted, manifest authenticated with a migration key
    migration_key_cipher: str | None
    migration_key_fingerprint: str | None
    ek_fingerprints: dict[str, str] = field(default_factory=dict)
    blobs: list[BlobInfo] = field(default_factory=list)
    files: list[MemberInfo] = field(default_factory=list)

    @property
    def members(self) -> list[MemberInfo | BlobInfo]:
        """Every member the manifest lists: the files, then the blobs."""
        return [*self.files, *self.blobs]

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **records.to_json(self)}

    @classmethod
    def from_json(cls, obj: Any) -> Manifest:
        """Strict: every key present with the right type, no unknown keys."""
        if not isinstance(obj, dict):
            raise _lie("it is not a JSON object")
        _check_format(obj)
        m = records.from_json(cls, obj, _lie, exact=True, handled=("format", "format_version"))
        _check_digests(m)
        _check_migration_key_fields(m)
        _check_blob_list(m)
        if [f.member for f in m.files] not in ([], [EK_FILE]):
            raise _lie(f"unexpected files {[f.member for f in m.files]}")
        return m


def _lie(what: str) -> BundleError:
    return BundleError(
        f"the bundle manifest is invalid: {what}; the bundle was altered or "
        "made by an incompatible tool"
    )


def _check_format(obj: dict[str, Any]) -> None:
    """A manifest of this format and version; anything else is not ours to read."""
    if obj.get("format") != FORMAT:
        raise BundleError(
            f"this is not a vtpmctl migration bundle (manifest format {obj.get('format')!r})"
        )
    version = obj.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"the bundle has format version {version!r}; this vtpmctl reads "
            f"version {FORMAT_VERSION} (upgrade vtpmctl on this host)"
        )


def _check_digests(m: Manifest) -> None:
    """Fingerprints and member hashes are SHA-256 hex; sizes are not negative."""
    if not all(_HEX64.fullmatch(v) for v in m.ek_fingerprints.values()):
        raise _lie("ek_fingerprints is not a map of algorithm to SHA-256 hex")
    for info in m.members:
        if info.size < 0 or not _HEX64.fullmatch(info.sha256):
            raise _lie(f"member entry {info.member!r} has a bad size or sha256")


def _check_migration_key_fields(m: Manifest) -> None:
    """The key flag, cipher and fingerprint say the same thing; the cipher is known."""
    if m.migration_key != (m.migration_key_cipher is not None) or m.migration_key != (
        m.migration_key_fingerprint is not None
    ):
        raise _lie("the migration key fields contradict each other")
    if m.migration_key_cipher not in (None, "aes-128-cbc", "aes-256-cbc"):
        raise _lie(f"unknown cipher {m.migration_key_cipher!r}")


def _check_blob_list(m: Manifest) -> None:
    """Permanent first, each type once in order, stored under its name, encrypted as said."""
    types = [b.type for b in m.blobs]
    order = [k.value for k in BlobKind]
    if not types or types[0] != BlobKind.PERMANENT or types != sorted(set(types), key=order.index):
        raise _lie(
            f"the blob list {types} must start with the permanent state and name "
            "each type once, in order"
        )
    if m.tpm_version == TpmFamily.TPM2.version and BlobKind.SAVESTATE in types:
        raise _lie("a TPM 2 has no savestate blob")
    for b in m.blobs:
        if b.member != f"{b.type}.blob":
            raise _lie(f"blob {b.type} is stored as {b.member!r}, not {b.type}.blob")
        if b.encrypted != m.migration_key:
            raise _lie(
                f"blob {b.type} is marked encrypted={b.encrypted} but the bundle "
                f"migration_key={m.migration_key}"
            )


# ---------------------------------------------------------------- manifest.sum


def _mac_key(key: AesKey) -> bytes:
    """A key of its own for the manifest MAC, derived from the migration key."""
    return hmac.new(key.material, _MAC_CONTEXT, hashlib.sha256).digest()


def manifest_sum(manifest: bytes, key: AesKey | None) -> bytes:
    lines = [f"sha256 {hashlib.sha256(manifest).hexdigest()}  {MANIFEST}\n"]
    if key is not None:
        mac = hmac.new(_mac_key(key), manifest, hashlib.sha256).hexdigest()
        lines.append(f"hmac-sha256 {mac}  {MANIFEST}\n")
    return "".join(lines).encode()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- write


@dataclass
class Source:
    """What the exporter knows about the instance it bundles."""

    name: str
    host: str
    state: str  # "stopped" | "running"
    created: str
    vtpmctl_version: str
    libtpms_version: str | None
    tpm_version: str
    transport: str
    encrypted_at_rest: bool
    ek_fingerprints: dict[str, str] = field(default_factory=dict)


def build_bundle(
    plain: dict[str, bytes], source: Source, *, ek_json: bytes | None, migration_key: AesKey | None
) -> bytes:
    """A bundle of the plaintext blobs ``plain`` (keys: BlobKind words; permanent required)."""
    from vtpmctl.store.keys import key_fingerprint

    if not plain.get(BlobKind.PERMANENT):
        raise BundleError("there is no permanent state to export")
    blobs: list[BlobInfo] = []
    members: list[tuple[str, bytes]] = []
    for kind in BlobKind:
        data = plain.get(kind)
        if not data:
            continue
        blob, _ = wrap_transfer(
            data, state_key=None, keep_state_encryption=False, migration_key=migration_key
        )
        info = BlobInfo(
            type=kind.value,
            member=f"{kind}.blob",
            size=len(blob),
            sha256=_sha256(blob),
            encrypted=migration_key is not None,
        )
        blobs.append(info)
        members.append((info.member, blob))
    files = []
    if ek_json is not None:
        files.append(MemberInfo(EK_FILE, len(ek_json), _sha256(ek_json)))
        members.insert(0, (EK_FILE, ek_json))
    manifest = Manifest(
        created=source.created,
        source_host=source.host,
        source_name=source.name,
        source_state=source.state,
        vtpmctl_version=source.vtpmctl_version,
        libtpms_version=source.libtpms_version,
        tpm_version=source.tpm_version,
        transport=source.transport,
        encrypted_at_rest=source.encrypted_at_rest,
        migration_key=migration_key is not None,
        migration_key_cipher=migration_key.cipher if migration_key else None,
        migration_key_fingerprint=key_fingerprint(migration_key) if migration_key else None,
        ek_fingerprints=dict(source.ek_fingerprints),
        blobs=blobs,
        files=files,
    )
    text = canonical_json(manifest.to_json())
    return write_tar([(MANIFEST, text), (SUM, manifest_sum(text, migration_key)), *members])


# ---------------------------------------------------------------- read


@dataclass
class Bundle:
    """A verified bundle: the manifest, the blobs as stored and their plaintext."""

    manifest: Manifest
    blobs: dict[str, bytes]  # transfer blobs (swtpm_ioctl --load input)
    plain: dict[str, bytes]  # libtpms state, decrypted
    ek_json: bytes | None
    authenticated: bool  # the manifest's MAC was checked with the migration key


def read_capped(stream: BinaryIO, what: str, cap: int = MAX_BUNDLE_SIZE) -> bytes:
    """All of ``stream``, refusing more than ``cap`` bytes (a bundle is small)."""
    chunks: list[bytes] = []
    size = 0
    while size <= cap:
        chunk = stream.read(min(1 << 20, cap + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > cap:
        raise BundleError(
            f"{what} is larger than {cap // (1024 * 1024)} MiB; that is not a vtpmctl bundle"
        )
    return b"".join(chunks)


def open_bundle(data: bytes, migration_key: AesKey | None) -> Bundle:
    """Check everything in ``data`` that bytes can tell (libtpms is the caller's).

    Order: tar structure, member names, manifest checksum, migration key and
    manifest MAC, manifest fields, member sizes and hashes, blob headers and
    decryption.
    """
    _check_bundle_size(data)
    members = read_tar(data)
    names = [n for n, _ in members]
    _check_member_names(names)
    content = dict(members)
    obj = _read_manifest(content[MANIFEST], content[SUM])
    authenticated = _check_migration_key(obj, content, migration_key)
    manifest = Manifest.from_json(obj)
    _check_listed_members(manifest, content, names[2:])
    blobs: dict[str, bytes] = {}
    plain: dict[str, bytes] = {}
    for info in manifest.blobs:
        blobs[info.type] = content[info.member]
        plain[info.type] = _open_blob(info, content[info.member], manifest, migration_key)
    return Bundle(manifest, blobs, plain, content.get(EK_FILE), authenticated)


def _check_bundle_size(data: bytes) -> None:
    """Not empty (a failed export) and not larger than any bundle vtpmctl writes."""
    if not data:
        raise BundleError("the bundle is empty (did the export fail?)")
    if len(data) > MAX_BUNDLE_SIZE:
        raise BundleError(
            f"the bundle is larger than {MAX_BUNDLE_SIZE // (1024 * 1024)} MiB; "
            "that is not a vtpmctl bundle"
        )


def _check_member_names(names: list[str]) -> None:
    """The manifest and its sum first, then known members, each once, in their order."""
    if (
        names[:2] != [MANIFEST, SUM]
        or len(set(names)) != len(names)
        or names != [n for n in MEMBER_ORDER if n in names]
    ):
        raise BundleError(
            f"the bundle has unexpected members {names}; it was altered or is not a vtpmctl bundle"
        )


def _read_manifest(text: bytes, sums: bytes) -> dict[str, Any]:
    """The manifest as a JSON object, after its SHA-256 line in manifest.sum matched."""
    lines = sums.decode("ascii", "replace").splitlines()
    if not lines or lines[0] != f"sha256 {_sha256(text)}  {MANIFEST}":
        raise BundleError(
            "the bundle is corrupted: manifest.json does not match its checksum in manifest.sum"
        )
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):  # nested past the recursion limit: malformed too
        raise _lie("it is not valid JSON") from None
    if not isinstance(obj, dict) or canonical_json(obj) != text:
        raise _lie("it is not in canonical form")
    return obj


def _check_migration_key(
    obj: dict[str, Any], content: dict[str, bytes], migration_key: AesKey | None
) -> bool:
    """A keyed bundle needs its key and a MAC that matches; a plain one takes no key.

    True when the manifest was authenticated with the key.
    """
    from vtpmctl.store.keys import key_fingerprint

    text, sums = content[MANIFEST], content[SUM]
    claims_key = obj.get("migration_key") is True
    keyed = len(sums.decode("ascii", "replace").splitlines()) > 1
    if keyed != claims_key:
        raise _lie("it disagrees with manifest.sum about the migration key")
    if not claims_key:
        if migration_key is not None:
            raise MigrationKeyError(
                "the bundle is not encrypted, but a migration key was given; it may have been "
                "replaced by an unprotected one. Drop --migration-key-file to import it as is"
            )
        if sums != manifest_sum(text, None):
            raise BundleError("the bundle is corrupted: manifest.sum is not in canonical form")
        return False
    fp = obj.get("migration_key_fingerprint")
    if migration_key is None:
        raise MigrationKeyError(
            f"the bundle is encrypted with a migration key ({obj.get('migration_key_cipher')}, "
            f"fingerprint {fp}); give that key with --migration-key-file"
        )
    if sums == manifest_sum(text, migration_key):
        return True
    if key_fingerprint(migration_key) != fp:
        raise MigrationKeyError(
            f"wrong migration key: the bundle was encrypted with key {fp}, the key "
            f"given is {key_fingerprint(migration_key)}; give the right key with "
            "--migration-key-file"
        )
    raise BundleError(
        "the bundle's manifest fails authentication with the migration "
        "key: it was altered or corrupted"
    )


def _check_listed_members(manifest: Manifest, content: dict[str, bytes], held: list[str]) -> None:
    """The manifest lists exactly the members the bundle holds, with their sizes and hashes."""
    listed = [info.member for info in manifest.members]
    if sorted(listed) != sorted(held):
        raise _lie(f"it lists members {sorted(listed)} but the bundle holds {sorted(held)}")
    for info in manifest.members:
        data = content[info.member]
        if len(data) != info.size or _sha256(data) != info.sha256:
            raise BundleError(
                f"the bundle is corrupted: {info.member} does not match the size "
                "and SHA-256 in the manifest"
            )


def _open_blob(
    info: BlobInfo, blob: bytes, manifest: Manifest, migration_key: AesKey | None
) -> bytes:
    """The plaintext state of one blob, whose header flags must say what the manifest says."""
    try:
        flags = parse_header(blob).flags
        if (
            not flags & FLAG_MIGRATION_DATA
            or flags & FLAG_ENCRYPTED
            or bool(flags & FLAG_MIGRATION_ENCRYPTED) != manifest.migration_key
        ):
            raise BlobError(0, f"unexpected blob header flags 0x{flags:02x}")
        state = unwrap_transfer(blob, state_flags=0, state_key=None, migration_key=migration_key)
    except BlobError as exc:
        raise BundleError(
            f"the {info.type} blob in the bundle is unusable: {exc.message}"
        ) from None
    if not state:
        raise BundleError(f"the {info.type} blob in the bundle is empty")
    return state
