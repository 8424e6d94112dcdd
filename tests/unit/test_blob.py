"""vtpmctl.store.blob against the byte layouts of docs/protocol.md#blob-layout, checked
independently."""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from vtpmctl.store.blob import (
    AesKey,
    BlobError,
    BlobHeader,
    parse_header,
    parse_tlvs,
    unwrap_file,
    unwrap_transfer,
    wrap_file,
    wrap_transfer,
)

K128 = AesKey(bytes(range(0x10, 0x20)))
K256 = AesKey(bytes(range(0x40, 0x60)))
M128 = AesKey(bytes(range(0x80, 0x90)))
M256 = AesKey(bytes(range(0xA0, 0xC0)))
OTHER256 = AesKey(bytes(32))
ALL_KEYS = [K128, K256, M128, M256, OTHER256]
STATE = bytes(range(256)) * 3 + b"tail"
LENGTHS = [0, 1, 15, 16, 17, 31, 32, 33, 64, 1000]


# --- independent helpers (written from the spec, not from the module) -----------------


def header(flags: int, body: bytes, *, version: int = 2, min_version: int = 1) -> bytes:
    return struct.pack(">BBHHI", version, min_version, 10, flags, 10 + len(body)) + body


def tlv(tag: int, value: bytes) -> bytes:
    return struct.pack(">HI", tag, len(value)) + value


def tlv_list(body: bytes) -> list[tuple[int, bytes]]:
    out = []
    offset = 0
    while offset < len(body):
        tag, length = struct.unpack_from(">HI", body, offset)
        out.append((tag, body[offset + 6 : offset + 6 + length]))
        offset += 6 + length
    assert offset == len(body)
    return out


def aes_cbc(key: bytes, iv: bytes, data: bytes, *, decrypt: bool = False) -> bytes:
    cipher = Cipher(algorithms.AES(key), modes.CBC(iv))
    op = cipher.decryptor() if decrypt else cipher.encryptor()
    return op.update(data) + op.finalize()


def swtpm_pad(data: bytes, n: int) -> bytes:
    p = n - len(data) % n
    return data + bytes([p]) * p


def authenticated_tlvs(key: AesKey, ct: bytes, iv: bytes, data_tag: int, iv_tag: int) -> bytes:
    mac = hmac.new(key.material, ct + iv, hashlib.sha256).digest()
    return tlv(data_tag, ct) + tlv(3, mac) + tlv(iv_tag, iv)


def encrypted_tlvs(key: AesKey, padded: bytes, data_tag: int, iv_tag: int) -> bytes:
    """Encrypt already padded data the spec's way, so tests can craft bad paddings."""
    iv = os.urandom(len(key.material))
    return authenticated_tlvs(key, aes_cbc(key.material, iv[:16], padded), iv, data_tag, iv_tag)


def legacy_encrypt(key: AesKey, state: bytes) -> bytes:
    """Version-1 body: zero IV, SHA-256 prefix, padded (docs/protocol.md#blob-layout, version 1)."""
    k = key.material
    return aes_cbc(k, bytes(16), swtpm_pad(hashlib.sha256(state).digest() + state, len(k)))


def check_encrypted_part(key: AesKey, body: bytes, tags: tuple[int, int, int]) -> bytes:
    """Verify order, IV length, padding and HMAC; return the plaintext.

    The rules: docs/protocol.md#state-files-and-encryption.
    """
    k = key.material
    records = tlv_list(body)
    assert [tag for tag, _ in records] == list(tags)
    ct, mac, iv = (value for _, value in records)
    assert len(iv) == len(k)
    assert len(ct) % len(k) == 0
    assert mac == hmac.new(k, ct + iv, hashlib.sha256).digest()
    padded = aes_cbc(k, iv[:16], ct, decrypt=True)
    p = padded[-1]
    assert 1 <= p <= len(k) and padded[-p:] == bytes([p]) * p
    return padded[:-p]


def transfer(
    plain: bytes = STATE,
    *,
    state_key: AesKey | None = None,
    keep: bool = False,
    mig: AesKey | None = None,
) -> bytes:
    blob, _ = wrap_transfer(plain, state_key=state_key, keep_state_encryption=keep,
                            migration_key=mig)  # fmt: skip
    return blob


def expect_rc(rc: int, fn: object, *args: object, **kwargs: object) -> BlobError:
    assert callable(fn)
    with pytest.raises(BlobError) as info:
        fn(*args, **kwargs)
    assert info.value.rc == rc, f"expected 0x{rc:02x}, got {info.value!r}"
    return info.value


# --- round trips -----------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, K128, K256], ids=["plain", "aes128", "aes256"])
@pytest.mark.parametrize("n", LENGTHS)
def test_file_round_trip(key: AesKey | None, n: int) -> None:
    plain = os.urandom(n)
    assert unwrap_file(wrap_file(plain, key), key) == plain


@pytest.mark.parametrize("n", [0, 31, 32, 1000])
@pytest.mark.parametrize("state_key", [None, K128, K256])
@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("mig", [None, M128, M256])
def test_transfer_round_trip(
    n: int, state_key: AesKey | None, keep: bool, mig: AesKey | None
) -> None:
    plain = os.urandom(n)
    blob, state_flags = wrap_transfer(
        plain, state_key=state_key, keep_state_encryption=keep, migration_key=mig
    )
    assert state_flags == (2 if keep and state_key else 0)
    got = unwrap_transfer(blob, state_flags=state_flags, state_key=state_key, migration_key=mig)
    assert got == plain


# --- exact layouts and flags -----------------------------------------------------------


def test_unencrypted_file_layout() -> None:
    assert wrap_file(b"abc", None) == bytes.fromhex("0201000a 0000 00000013 0001 00000003") + b"abc"


def test_unencrypted_transfer_layout() -> None:
    n = len(STATE)
    blob, flags = wrap_transfer(STATE, state_key=K256, keep_state_encryption=False,
                                migration_key=None)  # fmt: skip
    expected = (
        struct.pack(">BBHHI", 2, 1, 10, 0x0004, n + 22)
        + struct.pack(">HI", 4, n + 6)
        + struct.pack(">HI", 1, n)
        + STATE
    )
    assert (blob, flags) == (expected, 0)


@pytest.mark.parametrize(
    ("key", "flags"), [(None, 0x00), (K128, 0x01), (K256, 0x09)], ids=["plain", "128", "256"]
)
def test_file_flags(key: AesKey | None, flags: int) -> None:
    assert parse_header(wrap_file(STATE, key)).flags == flags


@pytest.mark.parametrize(
    ("state_key", "keep", "mig", "flags", "state_flags"),
    [
        (None, False, None, 0x04, 0),
        (None, True, None, 0x04, 0),  # nothing to keep without a state key
        (K256, False, None, 0x04, 0),  # DECRYPTED requested
        (K128, True, None, 0x05, 2),
        (K256, True, None, 0x0D, 2),
        (None, False, M128, 0x06, 0),
        (None, False, M256, 0x16, 0),
        (K256, False, M256, 0x16, 0),
        (K128, True, M256, 0x17, 2),
        (K256, True, M128, 0x0F, 2),
        (K256, True, M256, 0x1F, 2),
    ],
)
def test_transfer_flags(
    state_key: AesKey | None, keep: bool, mig: AesKey | None, flags: int, state_flags: int
) -> None:
    blob, got_state_flags = wrap_transfer(
        STATE, state_key=state_key, keep_state_encryption=keep, migration_key=mig
    )
    assert (parse_header(blob).flags, got_state_flags) == (flags, state_flags)


@pytest.mark.parametrize("key", [K128, K256], ids=["128", "256"])
@pytest.mark.parametrize("n", LENGTHS)
def test_file_encryption_matches_spec(key: AesKey, n: int) -> None:
    plain = os.urandom(n)
    blob = wrap_file(plain, key)
    klen = len(key.material)
    # Padding to the key length: one to klen bytes are always added.
    assert len(tlv_list(blob[10:])[0][1]) == (n // klen + 1) * klen
    assert check_encrypted_part(key, blob[10:], (2, 3, 6)) == plain


@pytest.mark.parametrize("mig", [M128, M256], ids=["128", "256"])
@pytest.mark.parametrize("state_key", [None, K128, K256], ids=["plain", "s128", "s256"])
def test_migration_encryption_matches_spec(mig: AesKey, state_key: AesKey | None) -> None:
    blob = transfer(state_key=state_key, keep=True, mig=mig)
    inner = check_encrypted_part(mig, blob[10:], (5, 3, 7))
    if state_key is None:
        assert inner == tlv(1, STATE)
    else:
        assert check_encrypted_part(state_key, inner, (2, 3, 6)) == STATE


def test_fresh_iv_every_time() -> None:
    ivs = {tlv_list(wrap_file(STATE, K256)[10:])[2][1] for _ in range(20)}
    assert len(ivs) == 20
    assert transfer(mig=M256) != transfer(mig=M256)


# --- what is accepted beyond our own output --------------------------------------------


def test_empty_and_header_only_clear() -> None:
    none = {"state_flags": 0, "state_key": None, "migration_key": None}
    assert unwrap_transfer(b"", **none) == b""  # type: ignore[arg-type]
    assert unwrap_transfer(bytes.fromhex("0201000a00040000000a"), **none) == b""  # type: ignore[arg-type]
    assert unwrap_transfer(bytes.fromhex("0201000a00000000000a"), **none) == b""  # type: ignore[arg-type]


def test_plain_blob_accepted_with_migration_key_configured() -> None:
    """swtpm's "upgrade" path: a receiver with a migration key takes unencrypted blobs."""
    assert unwrap_transfer(transfer(), state_flags=0, state_key=K256, migration_key=M256) == STATE


def test_tlv_order_does_not_matter_and_unknown_tags_are_ignored() -> None:
    records = tlv_list(wrap_file(STATE, K256)[10:])
    body = tlv(99, b"future") + b"".join(tlv(t, v) for t, v in reversed(records))
    assert unwrap_file(header(0x09, body), K256) == STATE


def test_missing_iv_means_zero_iv_and_mac_over_ciphertext() -> None:
    k = K128.material
    ct = aes_cbc(k, bytes(16), swtpm_pad(STATE, 16))
    mac = hmac.new(k, ct, hashlib.sha256).digest()
    assert unwrap_file(header(0x01, tlv(2, ct) + tlv(3, mac)), K128) == STATE


def test_longer_hmac_record_uses_first_32_bytes() -> None:
    ct, mac, iv = (v for _, v in tlv_list(wrap_file(STATE, K256)[10:]))
    body = tlv(2, ct) + tlv(3, mac + b"extra") + tlv(6, iv)
    assert unwrap_file(header(0x09, body), K256) == STATE


def test_state_flags_encrypted_request_decrypts_inner() -> None:
    """SET with state_flags=2 decrypts even if the header lacks 0x01 (128-bit key)."""
    inner = encrypted_tlvs(K128, swtpm_pad(STATE, 16), 2, 6)
    blob = header(0x04, tlv(4, inner))
    assert unwrap_transfer(blob, state_flags=2, state_key=K128, migration_key=None) == STATE


@pytest.mark.parametrize("key", [None, K128], ids=["plain", "aes128"])
def test_legacy_v1_file(key: AesKey | None) -> None:
    if key is None:
        blob = header(0x00, STATE, version=1)
    else:
        blob = header(0x01, legacy_encrypt(key, STATE), version=1)
    assert unwrap_file(blob, key) == STATE


@pytest.mark.parametrize(("flags", "state_flags"), [(0x00, 0), (0x02, 0), (0x03, 0), (0x02, 2)])
def test_legacy_v1_transfer(flags: int, state_flags: int) -> None:
    body = STATE
    if flags & 0x01 or state_flags & 2:
        body = legacy_encrypt(K256, body)
    if flags & 0x02:
        body = legacy_encrypt(M128, body)
    blob = header(flags, body, version=1)
    got = unwrap_transfer(blob, state_flags=state_flags, state_key=K256, migration_key=M128)
    assert got == STATE


def test_legacy_v1_checksum_mismatch() -> None:
    k = K128.material
    body = aes_cbc(k, bytes(16), swtpm_pad(bytes(32) + STATE, 16))
    expect_rc(0x09, unwrap_file, header(0x01, body, version=1), K128)


# --- error result codes ----------------------------------------------------------------


def _bad_padding_file(last: bytes) -> bytes:
    padded = STATE[: 64 - len(last)] + last
    return header(0x09, encrypted_tlvs(K256, padded, 2, 6))


def _with(blob: bytes, fmt: str, offset: int, value: int) -> bytes:
    out = bytearray(blob)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


@dataclass(frozen=True)
class Bad:
    name: str
    blob: bytes
    rc: int
    state_flags: int = 0
    state_key: AesKey | None = None
    migration_key: AesKey | None = None


TRANSFER_ERRORS = [
    Bad("short", b"\x02\x01\x00\x0a", 0x03),
    Bad("totlen too big", transfer()[:-1], 0x03),
    Bad("totlen too small", transfer() + b"\0", 0x03),
    Bad("hdrsize", _with(transfer(), ">H", 2, 12), 0x2B),
    Bad("min_version", _with(transfer(), ">B", 1, 3), 0x2E),
    Bad("raw file", wrap_file(STATE, None), 0x09),
    Bad("no outer tag", header(0x04, tlv(1, STATE)), 0x09),
    Bad("no inner tag", header(0x04, tlv(4, tlv(2, STATE))), 0x09),
    Bad("truncated TLV", header(0x04, tlv(4, tlv(1, STATE))[:-3]), 0x09),
    Bad("no migration key", transfer(mig=M256), 0x0D),
    Bad("no state key", transfer(state_key=K256, keep=True), 0x0D),
    Bad("no state key for state_flags", transfer(), 0x0D, state_flags=2),
    Bad("wrong migration key", transfer(mig=M256), 0x21, migration_key=OTHER256),
    Bad("wrong state key", transfer(state_key=K256, keep=True), 0x21, 2, OTHER256),
    Bad("128 blob, 256 key", transfer(mig=M128), 0x28, migration_key=M256),
    Bad("256 blob, 128 key", transfer(mig=M256), 0x28, migration_key=M128),
    Bad("state 256 blob, 128 key", transfer(state_key=K256, keep=True), 0x28, 2, K128),
    Bad("flags clear 0x10", _with(transfer(mig=M256), ">H", 4, 0x06), 0x28, migration_key=M256),
    Bad("no 0x04", _with(transfer(), ">H", 4, 0x00), 0x09),
    Bad("unknown flag", _with(transfer(), ">H", 4, 0x0104), 0x03),
    Bad("0x08 without 0x01", _with(transfer(), ">H", 4, 0x0C), 0x03),
    Bad("version 3", _with(transfer(), ">B", 0, 3), 0x2E),
    Bad("min_version 0", _with(transfer(), ">B", 1, 0), 0x2E),
]


@pytest.mark.parametrize("bad", TRANSFER_ERRORS, ids=lambda b: b.name)
def test_unwrap_transfer_errors(bad: Bad) -> None:
    expect_rc(
        bad.rc, unwrap_transfer, bad.blob, state_flags=bad.state_flags,
        state_key=bad.state_key, migration_key=bad.migration_key,
    )  # fmt: skip


FILE_ERRORS: list[tuple[str, bytes, AesKey | None, int]] = [
    ("encrypted, no key", wrap_file(STATE, K256), None, 0x0D),
    ("plain, key given", wrap_file(STATE, None), K256, 0x09),
    ("wrong key", wrap_file(STATE, K256), OTHER256, 0x21),
    ("key too short for 0x08", wrap_file(STATE, K256), K128, 0x28),
    ("key too long for 0x01", wrap_file(STATE, K128), K256, 0x28),
    ("no data tag", header(0x00, tlv(2, STATE)), None, 0x09),
    ("no ciphertext", header(0x09, tlv(3, bytes(32)) + tlv(6, bytes(32))), K256, 0x09),
    ("no hmac", header(0x09, tlv(2, bytes(32)) + tlv(6, bytes(32))), K256, 0x09),
    ("short hmac", header(0x09, tlv(2, bytes(32)) + tlv(3, bytes(31))), K256, 0x09),
    (
        "short iv",
        header(0x09, tlv(2, bytes(32)) + tlv(3, bytes(32)) + tlv(6, bytes(15))),
        K256,
        0x21,
    ),  # fmt: skip
    ("pad byte too large", _bad_padding_file(b"\x21"), K256, 0x21),
    ("pad byte zero", _bad_padding_file(b"\x00"), K256, 0x21),
    ("pad bytes differ", _bad_padding_file(b"\x01\x02"), K256, 0x21),
    (
        "ciphertext not whole blocks",
        header(0x09, authenticated_tlvs(K256, bytes(40), bytes(32), 2, 6)),
        K256,
        0x21,
    ),
    (
        "empty ciphertext",
        header(0x09, authenticated_tlvs(K256, b"", bytes(32), 2, 6)),
        K256,
        0x21,
    ),  # fmt: skip
    ("transfer blob", transfer(), None, 0x09),
    ("short", b"\x02", None, 0x03),
    ("totlen", wrap_file(STATE, None) + b"\0", None, 0x03),
    ("hdrsize", _with(wrap_file(STATE, None), ">H", 2, 9), None, 0x2B),
    ("min_version", _with(wrap_file(STATE, None), ">B", 1, 7), None, 0x2E),
]


@pytest.mark.parametrize(
    ("name", "blob", "key", "rc"), FILE_ERRORS, ids=[f[0] for f in FILE_ERRORS]
)
def test_unwrap_file_errors(name: str, blob: bytes, key: AesKey | None, rc: int) -> None:
    expect_rc(rc, unwrap_file, blob, key)


def test_bad_padding_helper_really_only_breaks_padding() -> None:
    good = header(0x09, encrypted_tlvs(K256, swtpm_pad(STATE[:40], 32), 2, 6))
    assert unwrap_file(good, K256) == STATE[:40]


# --- tampering anywhere is detected ----------------------------------------------------


TAMPER_TARGETS = {
    "file aes256": (wrap_file(STATE[:200], K256), {"key": K256}),
    "file aes128": (wrap_file(STATE[:200], K128), {"key": K128}),
    "transfer mig256": (transfer(STATE[:200], mig=M256), {"migration_key": M256}),
    "transfer mig128+state256": (
        transfer(STATE[:200], state_key=K256, keep=True, mig=M128),
        {"migration_key": M128, "state_key": K256},
    ),
    "transfer state128": (transfer(STATE[:200], state_key=K128, keep=True), {"state_key": K128}),
}


@pytest.mark.parametrize("target", list(TAMPER_TARGETS))
def test_tamper_every_byte(target: str) -> None:
    blob, keys = TAMPER_TARGETS[target]

    def unwrap(data: bytes) -> bytes:
        if target.startswith("file"):
            return unwrap_file(data, keys["key"])
        return unwrap_transfer(
            data, state_flags=0, state_key=keys.get("state_key"),
            migration_key=keys.get("migration_key"),
        )  # fmt: skip

    assert unwrap(blob) == STATE[:200]
    undetected = []
    for offset in range(len(blob)):
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(blob)
            bad[offset] ^= mask
            try:
                unwrap(bytes(bad))
            except BlobError:
                continue
            undetected.append((offset, mask))
    # An empty SET_STATEBLOB is a valid "clear" request, so cutting starts at one byte.
    for cut in range(0 if target.startswith("file") else 1, len(blob)):
        try:
            unwrap(blob[:cut])
        except BlobError:
            continue
        undetected.append((cut, -1))
    assert undetected == []


# --- parsing primitives ----------------------------------------------------------------


def test_parse_header_fields() -> None:
    blob = wrap_file(STATE, K256)
    assert parse_header(blob) == BlobHeader(2, 1, 10, 0x09, len(blob))


def test_parse_tlvs() -> None:
    assert parse_tlvs(b"") == {}
    assert parse_tlvs(tlv(1, b"a") + tlv(7, b"") + tlv(1, b"b")) == {1: b"a", 7: b""}
    expect_rc(0x09, parse_tlvs, tlv(1, b"abc")[:-1])
    expect_rc(0x09, parse_tlvs, tlv(1, b"abc") + b"\x00\x01\x00")


# --- secrets stay secret -----------------------------------------------------------------


def test_aes_key_repr_hides_material() -> None:
    @dataclass
    class Holder:
        key: AesKey

    for key in (K128, K256):
        shown = [repr(key), str(key), f"{key}", f"{key!r}", repr(Holder(key)), repr([key])]
        for text in shown:
            assert key.material.hex() not in text
            assert repr(key.material)[2:-1] not in text
        assert repr(key) == f"AesKey({key.bits}-bit)"


def test_aes_key_validation_and_equality() -> None:
    with pytest.raises(ValueError) as info:
        AesKey(b"secret-24-bytes-long-key")
    assert "secret" not in str(info.value)
    assert AesKey(bytes(K128.material)) == K128
    assert K128 != K256
    assert K128.__eq__(K128.material) is NotImplemented
    assert len({K128, AesKey(K128.material)}) == 1
    assert K256.cipher == "aes-256-cbc" and K128.cipher == "aes-128-cbc"


def _all_error_texts() -> list[str]:
    texts = []
    cases = [(b.blob, b.state_flags, b.state_key, b.migration_key) for b in TRANSFER_ERRORS]
    for blob, state_flags, state_key, migration_key in cases:
        try:
            unwrap_transfer(blob, state_flags=state_flags, state_key=state_key,
                            migration_key=migration_key)  # fmt: skip
        except BlobError as exc:
            texts += [str(exc), repr(exc), *map(str, exc.args)]
    for _, blob, key, _rc in FILE_ERRORS:
        try:
            unwrap_file(blob, key)
        except BlobError as exc:
            texts += [str(exc), repr(exc), *map(str, exc.args)]
    return texts


def test_errors_never_show_keys() -> None:
    texts = _all_error_texts()
    assert len(texts) >= 3 * (len(TRANSFER_ERRORS) + len(FILE_ERRORS))
    for key in ALL_KEYS:
        for text in texts:
            assert key.material.hex() not in text
            assert repr(key.material)[2:-1] not in text


def test_blob_error_carries_rc() -> None:
    err = BlobError(0x21, "HMAC mismatch")
    assert (err.rc, str(err)) == (0x21, "HMAC mismatch")
    assert "0x21" in repr(err)


def test_state_file_without_a_header_is_its_payload() -> None:
    """swtpm loads a file with no valid header as the bare (version 1) payload."""
    payload = b"\x00\x03" + STATE
    assert unwrap_file(payload, None) == payload
    with pytest.raises(BlobError):
        unwrap_file(payload, K256)  # not a legacy ciphertext of this key
