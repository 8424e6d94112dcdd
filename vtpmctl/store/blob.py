"""swtpm-compatible state blobs: the 10-byte header, TLV bodies and AES-CBC + HMAC.

Two shapes share the header (docs/protocol.md#blob-layout):

* state *files* (``tpm2-00.permall`` …): ``hdr [1 plain]`` or ``hdr [2 ct][3 mac][6 iv]``;
* state *transfer* blobs (CMD_GET_STATEBLOB / CMD_SET_STATEBLOB): ``hdr(0x04|…)`` plus an
  outer TLV 4 (clear) or 5/3/7 (migration key) that wraps a file-style inner part.

Everything here is pure bytes-in, bytes-out so that the engine, the control channel and
the blob store all agree on one implementation. Result codes are the control-channel
values (docs/protocol.md#result-codes) because a failed SET_STATEBLOB has to report exactly those.

Deliberately stricter than swtpm on input that swtpm itself never produces (so that any
corruption of an encrypted blob is caught, the header not being covered by the HMAC):
the header version must be 1 or 2, unknown flag bits and a 256-bit flag without its
"encrypted" flag are rejected, TLV bodies must parse completely, a version-2 transfer
blob must carry flag 0x04, and a file's encryption flag must agree with whether a key is
given. Everything swtpm 0.7.1-0.11 writes is accepted.
"""

from __future__ import annotations

import contextlib
import os
import struct

# The protocol table sits below the store: a BlobError carries the control result.
from vtpmctl.device.protocol import Res, StateFlag
from vtpmctl.errors import StoreError
from vtpmctl.frozen import Frozen

__all__ = [
    "AesKey",
    "BlobError",
    "BlobHeader",
    "file_key_bits",
    "file_key_matches",
    "has_header",
    "parse_header",
    "parse_tlvs",
    "unwrap_file",
    "unwrap_transfer",
    "wrap_file",
    "wrap_transfer",
]

HEADER_SIZE = 10
HEADER_VERSION = 2
HEADER_MIN_VERSION = 1
_HEADER = struct.Struct(">BBHHI")
_TLV = struct.Struct(">HI")
_HEADER_TAIL = bytes([HEADER_MIN_VERSION]) + HEADER_SIZE.to_bytes(2, "big")

FLAG_ENCRYPTED = 0x01
FLAG_MIGRATION_ENCRYPTED = 0x02
FLAG_MIGRATION_DATA = 0x04
FLAG_ENCRYPTED_256BIT_KEY = 0x08
FLAG_MIGRATION_256BIT_KEY = 0x10
_KNOWN_FLAGS = 0x1F

TAG_DATA = 1
TAG_ENCRYPTED_DATA = 2
TAG_HMAC = 3
TAG_MIGRATION_DATA = 4
TAG_ENCRYPTED_MIGRATION_DATA = 5
TAG_IVEC_ENCRYPTED_DATA = 6
TAG_IVEC_ENCRYPTED_MIGRATION_DATA = 7

_HMAC_SIZE = 32
_AES_BLOCK = 16


class BlobError(StoreError):
    """A blob that cannot be used; ``.rc`` is the control-channel result to report.

    See docs/protocol.md#result-codes.
    """

    def __init__(self, rc: int, message: str) -> None:
        super().__init__(message)
        self.rc = rc
        self.message = message

    def __repr__(self) -> str:
        return f"BlobError(rc=0x{self.rc:02x}, {self.message!r})"


class AesKey(Frozen):
    """An AES-128/256 key; wrapped so that printing or logging it can never leak the bytes."""

    __slots__ = ("material",)
    material: bytes

    def __init__(self, material: bytes) -> None:
        if not isinstance(material, (bytes, bytearray, memoryview)):
            raise TypeError("AesKey material must be bytes")
        material = bytes(material)
        if len(material) not in (16, 32):
            raise ValueError(f"an AES key must be 16 or 32 bytes, not {len(material)}")
        self._init(material=material)

    @property
    def bits(self) -> int:
        return len(self.material) * 8

    @property
    def cipher(self) -> str:
        """The swtpm ``mode=`` spelling, for command lines and metadata."""
        return f"aes-{self.bits}-cbc"

    def __repr__(self) -> str:
        return f"AesKey({self.bits}-bit)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        # Constant time, so comparing a candidate key does not leak a prefix match.
        if not isinstance(other, AesKey):
            return NotImplemented
        return _same(self.material, other.material)

    def __hash__(self) -> int:
        return hash((AesKey, self.material))


class BlobHeader(Frozen):
    """The packed big-endian header shared by state files and transfer blobs.

    See docs/protocol.md#blob-layout.
    """

    __slots__ = ("version", "min_version", "hdrsize", "flags", "totlen")
    version: int
    min_version: int
    hdrsize: int
    flags: int
    totlen: int

    def __init__(
        self, version: int, min_version: int, hdrsize: int, flags: int, totlen: int
    ) -> None:
        self._init(
            version=version, min_version=min_version, hdrsize=hdrsize, flags=flags, totlen=totlen
        )


def _header(flags: int, body_len: int) -> bytes:
    return _HEADER.pack(
        HEADER_VERSION, HEADER_MIN_VERSION, HEADER_SIZE, flags, HEADER_SIZE + body_len
    )


def _tlv(tag: int, value: bytes) -> bytes:
    return _TLV.pack(tag, len(value)) + value


def parse_header(data: bytes) -> BlobHeader:
    """Validate the header the way swtpm does, so SET_STATEBLOB reports the same codes."""
    if len(data) < HEADER_SIZE:
        raise BlobError(
            Res.BAD_PARAMETER, f"blob is {len(data)} bytes, shorter than its 10-byte header"
        )
    version, min_version, hdrsize, flags, totlen = _HEADER.unpack_from(data)
    header = BlobHeader(version, min_version, hdrsize, flags, totlen)
    if totlen != len(data):
        raise BlobError(
            Res.BAD_PARAMETER,
            f"blob header says {totlen} bytes but the blob has {len(data)} (truncated or padded)",
        )
    if min_version > HEADER_VERSION:
        raise BlobError(
            Res.BAD_VERSION,
            f"blob needs a reader of format version {min_version}; this one reads up to "
            f"{HEADER_VERSION}",
        )
    if hdrsize != HEADER_SIZE:
        raise BlobError(Res.BAD_DATASIZE, f"blob header size is {hdrsize}, expected 10")
    # Beyond this point swtpm would carry on; see the module docstring for why we do not.
    if version not in (1, 2) or min_version < 1 or min_version > version:
        raise BlobError(
            Res.BAD_VERSION,
            f"unsupported blob format version {version} (minimum {min_version}); expected 1 or 2",
        )
    if flags & ~_KNOWN_FLAGS:
        raise BlobError(Res.BAD_PARAMETER, f"blob header has unknown flags 0x{flags:04x}")
    if flags & FLAG_ENCRYPTED_256BIT_KEY and not flags & FLAG_ENCRYPTED:
        raise BlobError(Res.BAD_PARAMETER, "blob header has the 256-bit flag 0x08 without 0x01")
    if flags & FLAG_MIGRATION_256BIT_KEY and not flags & FLAG_MIGRATION_ENCRYPTED:
        raise BlobError(Res.BAD_PARAMETER, "blob header has the 256-bit flag 0x10 without 0x02")
    return header


def parse_tlvs(body: bytes) -> dict[int, bytes]:
    """Split a version-2 body; the first record of a tag wins, as in swtpm's tag search."""
    records: dict[int, bytes] = {}
    offset = 0
    view = memoryview(body)
    while offset < len(body):
        if len(body) - offset < _TLV.size:
            raise BlobError(Res.FAIL, f"truncated TLV record header at offset {offset}")
        tag, length = _TLV.unpack_from(body, offset)
        offset += _TLV.size
        if length > len(body) - offset:
            raise BlobError(
                Res.FAIL,
                f"TLV record with tag {tag} claims {length} bytes but only "
                f"{len(body) - offset} remain",
            )
        records.setdefault(tag, bytes(view[offset : offset + length]))
        offset += length
    return records


# --- AES-CBC + HMAC-SHA256 (docs/protocol.md#state-files-and-encryption) -------------


# hashlib and hmac only where a key is used: a plain state file needs neither, and
# hashlib loads OpenSSL's libcrypto (2-3 ms of a plain `vtpmctl start`).


def _hmac_sha256(key: bytes, data: bytes) -> bytes:
    import hashlib
    import hmac

    return hmac.new(key, data, hashlib.sha256).digest()


def _same(a: bytes, b: bytes) -> bool:
    """Constant time, so a comparison does not leak how much of a secret matched."""
    import hmac

    return hmac.compare_digest(a, b)


def preload_keys() -> None:
    """Load now what a key's first use loads (hashlib, hmac, libcrypto's AES).

    For a process that can load nothing later (``swtpm --chroot``), and for the
    zygote, whose daemons then share it instead of loading it each.
    """
    import hashlib  # noqa: F401
    import hmac  # noqa: F401

    from vtpmctl.store import aes

    aes.preload()


def _cbc(encrypt: bool, key: bytes, iv: bytes, data: bytes) -> bytes:
    """AES-CBC of whole blocks through libcrypto (store.aes); the padding is swtpm's, ours."""
    from vtpmctl.store import aes  # ctypes: only where a key is used

    try:
        return aes.cbc_encrypt(key, iv, data) if encrypt else aes.cbc_decrypt(key, iv, data)
    except StoreError as exc:
        raise BlobError(Res.FAIL, str(exc)) from exc


def _encrypt(key: AesKey, plain: bytes, data_tag: int, iv_tag: int) -> bytes:
    """Encrypt-then-MAC with swtpm's quirks: key-length padding and a key-length IV."""
    k = key.material
    iv_full = os.urandom(len(k))
    pad = len(k) - len(plain) % len(k)
    ciphertext = _cbc(True, k, iv_full[:_AES_BLOCK], plain + bytes([pad]) * pad)
    mac = _hmac_sha256(k, ciphertext + iv_full)
    return _tlv(data_tag, ciphertext) + _tlv(TAG_HMAC, mac) + _tlv(iv_tag, iv_full)


def _cbc_decrypt(key: AesKey, iv: bytes, ciphertext: bytes, what: str) -> bytes:
    k = key.material
    if not ciphertext or len(ciphertext) % _AES_BLOCK:
        raise BlobError(
            Res.DECRYPT_ERROR, f"{what}: ciphertext length {len(ciphertext)} is not a whole block"
        )
    padded = _cbc(False, k, iv, ciphertext)
    # swtpm accepts any pad value up to the key length (it pads to the key length on
    # output); anything else means a wrong key or corruption.
    pad = padded[-1]
    if not 1 <= pad <= len(k) or padded[-pad:] != bytes([pad]) * pad:
        raise BlobError(Res.DECRYPT_ERROR, f"{what}: bad padding after decryption (wrong key?)")
    return padded[:-pad]


def _check_key_size(key: AesKey, flags: int, flag_256: int, what: str) -> None:
    wants = 32 if flags & flag_256 else 16
    if len(key.material) != wants:
        raise BlobError(
            Res.BAD_KEY_PROPERTY,
            f"{what} was encrypted with a {wants * 8}-bit key but the configured key is "
            f"{key.bits}-bit",
        )


def _decrypt_v2(
    key: AesKey, records: dict[int, bytes], data_tag: int, iv_tag: int, what: str
) -> bytes:
    ciphertext = records.get(data_tag)
    mac = records.get(TAG_HMAC)
    if ciphertext is None:
        raise BlobError(Res.FAIL, f"{what}: no encrypted-data record (tag {data_tag})")
    if mac is None or len(mac) < _HMAC_SIZE:
        raise BlobError(Res.FAIL, f"{what}: HMAC record (tag {TAG_HMAC}) missing or short")
    iv_full = records.get(iv_tag)
    if iv_full is None:
        # Pre-IV swtpm: zero IV, MAC over the ciphertext alone.
        iv_full, iv = b"", bytes(_AES_BLOCK)
    elif len(iv_full) < _AES_BLOCK:
        raise BlobError(Res.DECRYPT_ERROR, f"{what}: IV record is only {len(iv_full)} bytes")
    else:
        iv = iv_full[:_AES_BLOCK]
    expected = _hmac_sha256(key.material, ciphertext + iv_full)
    if not _same(expected, mac[:_HMAC_SIZE]):
        raise BlobError(Res.DECRYPT_ERROR, f"{what}: HMAC mismatch (wrong key or corrupted)")
    return _cbc_decrypt(key, iv, ciphertext, what)


def _decrypt_v1(key: AesKey, body: bytes, what: str) -> bytes:
    """Legacy format: zero IV, plaintext prefixed by its own SHA-256 (docs/protocol.md)."""
    plain = _cbc_decrypt(key, bytes(_AES_BLOCK), body, what)
    digest, state = plain[:32], plain[32:]
    import hashlib

    if len(digest) < 32 or not _same(digest, hashlib.sha256(state).digest()):
        raise BlobError(Res.FAIL, f"{what}: checksum mismatch (wrong key or corrupted)")
    return state


def _plain_v2(records: dict[int, bytes], tag: int, what: str) -> bytes:
    value = records.get(tag)
    if value is None:
        raise BlobError(Res.FAIL, f"{what}: no record with tag {tag}")
    return value


# --- state files -----------------------------------------------------------------------


def wrap_file(plain: bytes, key: AesKey | None) -> bytes:
    """Bytes of a ``tpm2-00.*`` file as swtpm writes it with (or without) ``--key``."""
    if key is None:
        return _header(0, len(plain) + _TLV.size) + _tlv(TAG_DATA, plain)
    flags = FLAG_ENCRYPTED | (FLAG_ENCRYPTED_256BIT_KEY if key.bits == 256 else 0)
    body = _encrypt(key, plain, TAG_ENCRYPTED_DATA, TAG_IVEC_ENCRYPTED_DATA)
    return _header(flags, len(body)) + body


def has_header(data: bytes) -> bool:
    """The state file starts like a blob header (else it is a headerless payload).

    swtpm reads a file whose header does not validate as a payload without a header
    (older swtpm wrote them, docs/protocol.md#blob-layout). Here a file that starts
    with a header version (1 or 2), or with the fixed bytes after it (min_version 1,
    hdrsize 10), keeps its header's errors, so a damaged file is reported as such
    rather than handed to libtpms. A libtpms state starts with a zero byte and then
    a u16 version or magic, so no real payload is mistaken for a header.
    """
    return len(data) >= HEADER_SIZE and (data[0] in (1, 2) or data[1:4] == _HEADER_TAIL)


def unwrap_file(data: bytes, key: AesKey | None) -> bytes:
    """Plain libtpms state from a state file.

    As in swtpm, whether a key is configured decides how the file is read; a header that
    disagrees is reported clearly instead of as a failed decryption (0x0d for a missing
    key, where swtpm's file loader only says TPM_FAIL). A file without a header is the
    payload itself, or with a key its legacy (version 1) encryption.
    """
    if len(data) < HEADER_SIZE:
        raise BlobError(
            Res.BAD_PARAMETER, f"state file is {len(data)} bytes, too short for a TPM state"
        )
    if not has_header(data):
        return data if key is None else _decrypt_v1(key, data, "state file without a header")
    try:
        header = parse_header(data)
    except BlobError:
        # Legacy ciphertext without a header starts with 1 or 2 one time in 128.
        if key is not None:
            with contextlib.suppress(BlobError):
                return _decrypt_v1(key, data, "state file without a header")
        raise
    body = data[HEADER_SIZE:]
    if header.flags & (FLAG_MIGRATION_DATA | FLAG_MIGRATION_ENCRYPTED):
        raise BlobError(
            Res.FAIL,
            "this is a state transfer blob (CMD_GET_STATEBLOB output), not a state file",
        )
    encrypted = bool(header.flags & FLAG_ENCRYPTED)
    if encrypted and key is None:
        raise BlobError(Res.KEYNOTFOUND, "state file is encrypted but no state key is configured")
    if key is not None and not encrypted:
        raise BlobError(
            Res.FAIL,
            "state file is not encrypted but a state key is configured; "
            "import it through a state transfer to encrypt it",
        )
    if header.version == 1:
        return body if key is None else _decrypt_v1(key, body, "state file")
    records = parse_tlvs(body)
    if key is None:
        return _plain_v2(records, TAG_DATA, "state file")
    _check_key_size(key, header.flags, FLAG_ENCRYPTED_256BIT_KEY, "state file")
    return _decrypt_v2(key, records, TAG_ENCRYPTED_DATA, TAG_IVEC_ENCRYPTED_DATA, "state file")


def file_key_bits(data: bytes) -> int | None:
    """The key size an encrypted state file names in its header; None if it names none."""
    if not has_header(data):
        return None
    flags = _HEADER.unpack_from(data)[3]
    if data[0] != 2 or not flags & FLAG_ENCRYPTED:
        return None
    return 256 if flags & FLAG_ENCRYPTED_256BIT_KEY else 128


def file_key_matches(data: bytes, key: AesKey) -> bool:
    """``key`` opens this encrypted state file (its HMAC or legacy checksum agrees).

    Used to find which derivation of a passphrase (kdf, key size) swtpm used, which
    the file does not record.
    """
    try:
        unwrap_file(data, key)
    except BlobError:
        return False
    return True


# --- state transfer blobs (CMD_GET_STATEBLOB / CMD_SET_STATEBLOB) ----------------------


def wrap_transfer(
    plain: bytes,
    *,
    state_key: AesKey | None,
    keep_state_encryption: bool,
    migration_key: AesKey | None,
) -> tuple[bytes, int]:
    """Build the GET_STATEBLOB blob and the response state_flags, as swtpm does.

    The layout: docs/protocol.md#blob-layout.

    ``keep_state_encryption`` is "the client did not ask for DECRYPTED"; it only has an
    effect when a state key is configured.
    """
    flags = FLAG_MIGRATION_DATA
    state_flags = 0
    if keep_state_encryption and state_key is not None:
        inner = _encrypt(state_key, plain, TAG_ENCRYPTED_DATA, TAG_IVEC_ENCRYPTED_DATA)
        flags |= FLAG_ENCRYPTED | (FLAG_ENCRYPTED_256BIT_KEY if state_key.bits == 256 else 0)
        state_flags = StateFlag.ENCRYPTED
    else:
        inner = _tlv(TAG_DATA, plain)
    if migration_key is None:
        outer = _tlv(TAG_MIGRATION_DATA, inner)
    else:
        outer = _encrypt(
            migration_key, inner, TAG_ENCRYPTED_MIGRATION_DATA, TAG_IVEC_ENCRYPTED_MIGRATION_DATA
        )
        flags |= FLAG_MIGRATION_ENCRYPTED
        if migration_key.bits == 256:
            flags |= FLAG_MIGRATION_256BIT_KEY
    return _header(flags, len(outer)) + outer, state_flags


def unwrap_transfer(
    blob: bytes,
    *,
    state_flags: int,
    state_key: AesKey | None,
    migration_key: AesKey | None,
) -> bytes:
    """Plain libtpms state from a SET_STATEBLOB blob; b"" means "clear the staged state".

    Unencrypted blobs are accepted even when a migration key is set (swtpm's upgrade path).
    """
    if not blob:
        return b""
    header = parse_header(blob)
    body = blob[HEADER_SIZE:]
    if not body:
        return b""
    legacy = header.version == 1
    if not legacy and not header.flags & FLAG_MIGRATION_DATA:
        raise BlobError(
            Res.FAIL,
            "not a state transfer blob (header flag 0x04 missing); a state file such as "
            "tpm2-00.permall cannot be sent through SET_STATEBLOB",
        )

    if header.flags & FLAG_MIGRATION_ENCRYPTED:
        if migration_key is None:
            raise BlobError(
                Res.KEYNOTFOUND, "blob is encrypted with a migration key but none is configured"
            )
        if legacy:
            inner = _decrypt_v1(migration_key, body, "migration blob")
        else:
            _check_key_size(
                migration_key, header.flags, FLAG_MIGRATION_256BIT_KEY, "migration blob"
            )
            inner = _decrypt_v2(
                migration_key,
                parse_tlvs(body),
                TAG_ENCRYPTED_MIGRATION_DATA,
                TAG_IVEC_ENCRYPTED_MIGRATION_DATA,
                "migration blob",
            )
    elif legacy:
        inner = body
    else:
        inner = _plain_v2(parse_tlvs(body), TAG_MIGRATION_DATA, "state transfer blob")

    if state_flags & StateFlag.ENCRYPTED or header.flags & FLAG_ENCRYPTED:
        if state_key is None:
            raise BlobError(
                Res.KEYNOTFOUND, "blob is encrypted with a state key but none is configured"
            )
        if legacy:
            return _decrypt_v1(state_key, inner, "state-key encrypted blob")
        _check_key_size(
            state_key, header.flags, FLAG_ENCRYPTED_256BIT_KEY, "state-key encrypted blob"
        )
        return _decrypt_v2(
            state_key,
            parse_tlvs(inner),
            TAG_ENCRYPTED_DATA,
            TAG_IVEC_ENCRYPTED_DATA,
            "state-key encrypted blob",
        )
    if legacy:
        return inner
    return _plain_v2(parse_tlvs(inner), TAG_DATA, "state transfer blob")
