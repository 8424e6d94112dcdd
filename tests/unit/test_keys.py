"""vtpmctl.store.keys: swtpm's key-file syntax (docs/protocol.md#keys) and safe secret files."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from vtpmctl.store.blob import AesKey, unwrap_file, wrap_file
from vtpmctl.store.keys import (
    KeyFileError,
    check_secret_file_mode,
    choose_passphrase_key,
    derive_passphrase_key,
    encode_hex_key,
    generate_key,
    key_fingerprint,
    load_key,
    parse_key_spec,
    write_secret_file,
)

RAW16 = bytes.fromhex("00ff10ef20df30cf40bf50af609f708f")  # not all hex digits as text
RAW32 = bytes(range(0xE0, 0x100))


def put(tmp_path: Path, content: bytes, name: str = "key") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    path.chmod(0o600)
    return path


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# --- hex -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "material"),
    [
        (RAW32.hex().encode(), RAW32),
        (b"0x" + RAW32.hex().encode() + b"\n", RAW32),
        (RAW32.hex().upper().encode() + b"\r\n", RAW32),
        (RAW16.hex().encode() + b"\n", RAW16),
        (b"0x" + RAW16.hex().encode(), RAW16),
        (RAW16.hex().encode() + b"  \n\n", RAW16),
    ],
    ids=["64", "0x64-newline", "upper-crlf", "32-newline", "0x32", "32-spaces"],
)
@pytest.mark.parametrize("kind", ["auto", "hex"])
def test_hex_keys(tmp_path: Path, content: bytes, material: bytes, kind: str) -> None:
    key = load_key(put(tmp_path, content), kind=kind)  # type: ignore[arg-type]
    assert key.material == material
    cipher = "aes-256-cbc" if len(material) == 32 else "aes-128-cbc"
    assert load_key(put(tmp_path, content), kind=kind, cipher=cipher) == key  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "content",
    [
        RAW32.hex()[:-1].encode(),  # 63 digits
        RAW32.hex().encode() + b"a",  # 65
        RAW16.hex()[:-1].encode() + b"\n",  # 31
        (RAW32.hex()[:48]).encode(),  # 24 bytes
        b"0X" + RAW16.hex().encode(),  # swtpm only knows a lowercase 0x
        b" " + RAW16.hex().encode(),
        RAW16.hex().encode() + b"\ncomment",
        RAW16.hex()[:-1].encode() + b"g",
        b"",
    ],
    ids=["63", "65", "31", "48", "0X", "leading-space", "trailing-text", "non-hex", "empty"],
)
def test_bad_hex_keys(tmp_path: Path, content: bytes) -> None:
    path = put(tmp_path, content)
    with pytest.raises(KeyFileError) as info:
        load_key(path, kind="hex")
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("material", "cipher"), [(RAW32, "aes-128-cbc"), (RAW16, "aes-256-cbc")])
def test_hex_length_must_match_cipher(tmp_path: Path, material: bytes, cipher: str) -> None:
    path = put(tmp_path, material.hex().encode() + b"\n")
    with pytest.raises(KeyFileError, match="bit"):
        load_key(path, kind="hex", cipher=cipher)  # type: ignore[arg-type]


# --- binary ----------------------------------------------------------------------------


@pytest.mark.parametrize("material", [RAW16, RAW32], ids=["16", "32"])
@pytest.mark.parametrize("kind", ["auto", "binary"])
def test_binary_keys(tmp_path: Path, material: bytes, kind: str) -> None:
    assert load_key(put(tmp_path, material), kind=kind).material == material  # type: ignore[arg-type]


def test_binary_16_bytes_with_aes256_is_aes128_like_swtpm(tmp_path: Path) -> None:
    key = load_key(put(tmp_path, RAW16), kind="binary", cipher="aes-256-cbc")
    assert key.material == RAW16


def test_binary_32_bytes_with_aes128_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="aes-128"):
        load_key(put(tmp_path, RAW32), kind="binary", cipher="aes-128-cbc")


@pytest.mark.parametrize("n", [0, 1, 15, 17, 24, 31, 33, 64])
@pytest.mark.parametrize("kind", ["auto", "binary"])
def test_binary_wrong_lengths(tmp_path: Path, n: int, kind: str) -> None:
    content = (RAW32 * 3)[:n]
    path = put(tmp_path, content)
    with pytest.raises(KeyFileError) as info:
        load_key(path, kind=kind)  # type: ignore[arg-type]
    message = str(info.value)
    assert str(path) in message and f"{n} bytes" in message
    if content:
        assert content.hex() not in message


def test_auto_prefers_hex_for_a_32_char_hex_file(tmp_path: Path) -> None:
    """A 32-byte file of hex digits is a 128-bit hex key, as the auto rule says."""
    content = RAW16.hex().encode()
    assert len(content) == 32
    assert load_key(put(tmp_path, content)).material == RAW16
    assert load_key(put(tmp_path, content), kind="binary").material == content


# --- passphrases -----------------------------------------------------------------------


PASSWORDS = [b"mypassword", b"correct horse battery staple\n", "pässwörd".encode(), b"\x00x"]


@pytest.mark.parametrize("password", PASSWORDS)
@pytest.mark.parametrize(("cipher", "n"), [(None, 32), ("aes-256-cbc", 32), ("aes-128-cbc", 16)])
def test_passphrase_pbkdf2(tmp_path: Path, password: bytes, cipher: str | None, n: int) -> None:
    key = load_key(put(tmp_path, password), kind="passphrase", cipher=cipher)  # type: ignore[arg-type]
    assert key.material == hashlib.pbkdf2_hmac("sha512", password, b"swtpm", 1000, n)


@pytest.mark.parametrize("password", PASSWORDS)
@pytest.mark.parametrize(("cipher", "n"), [(None, 32), ("aes-128-cbc", 16)])
def test_passphrase_sha512(tmp_path: Path, password: bytes, cipher: str | None, n: int) -> None:
    path = put(tmp_path, password)
    key = load_key(path, kind="passphrase", cipher=cipher, kdf="sha512")  # type: ignore[arg-type]
    assert key.material == hashlib.sha512(password).digest()[:n]


def test_passphrase_known_answers(tmp_path: Path) -> None:
    """Pinned values (cross-checked with ``openssl kdf``/``openssl dgst``), so a change of
    salt, iteration count, hash or length is caught."""
    path = put(tmp_path, b"mypassword")
    assert load_key(path, kind="passphrase").material.hex() == (
        "cb9eea7ed94a94b283eb372f4fac80141cda0e4762892d278f1872ace021152d"
    )
    assert load_key(path, kind="passphrase", cipher="aes-128-cbc").material.hex() == (
        "cb9eea7ed94a94b283eb372f4fac8014"
    )
    sha = load_key(path, kind="passphrase", cipher="aes-128-cbc", kdf="sha512")
    assert sha.material.hex() == "a336f671080fbf4f2a230f313560ddf0"


def test_passphrase_newline_is_part_of_it(tmp_path: Path) -> None:
    a = load_key(put(tmp_path, b"secret", "a"), kind="passphrase")
    b = load_key(put(tmp_path, b"secret\n", "b"), kind="passphrase")
    assert a != b


def test_passphrase_empty(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="empty"):
        load_key(put(tmp_path, b""), kind="passphrase")


def test_auto_never_guesses_passphrases(tmp_path: Path) -> None:
    path = put(tmp_path, b"a passphrase that is long")
    with pytest.raises(KeyFileError) as info:
        load_key(path)
    assert "passphrase" in str(info.value) and "long" not in str(info.value)


# --- file problems ---------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        load_key(tmp_path / "nope")


def test_directory_is_not_a_key(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_key(tmp_path)


def test_huge_file_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="larger"):
        load_key(put(tmp_path, b"x" * 70000), kind="passphrase")


def test_unknown_kind_or_cipher(tmp_path: Path) -> None:
    path = put(tmp_path, RAW16)
    with pytest.raises(ValueError):
        load_key(path, kind="pem")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        load_key(path, cipher="aes-192-cbc")  # type: ignore[arg-type]


# --- permissions -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700])
def test_mode_ok(tmp_path: Path, mode: int) -> None:
    path = put(tmp_path, RAW16)
    path.chmod(mode)
    check_secret_file_mode(path)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o602, 0o610])
def test_mode_too_open(tmp_path: Path, mode: int) -> None:
    path = put(tmp_path, RAW16)
    path.chmod(mode)
    with pytest.raises(KeyFileError) as info:
        check_secret_file_mode(path)
    assert f"chmod 600 {path}" in str(info.value)
    assert f"{mode:04o}" in str(info.value)


def test_owner_must_be_us(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        path = put(tmp_path, RAW16)
        os.chown(path, 65534, -1)
    else:
        path = Path("/etc/passwd")  # owned by root, so not by us
    with pytest.raises(KeyFileError, match="chown"):
        check_secret_file_mode(path)


def test_mode_check_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        check_secret_file_mode(tmp_path / "nope")
    tmp_path.chmod(0o700)
    with pytest.raises(KeyFileError, match="regular file"):
        check_secret_file_mode(tmp_path)


# --- writing ---------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0, 0o022, 0o277])
def test_write_secret_file_is_0600(tmp_path: Path, mask: int) -> None:
    path = tmp_path / "secret"
    old = os.umask(mask)
    try:
        write_secret_file(path, b"top secret")
    finally:
        os.umask(old)
    assert path.read_bytes() == b"top secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    check_secret_file_mode(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret"]


def test_write_secret_file_replaces_atomically(tmp_path: Path, umask: None) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"old")
    path.chmod(0o644)
    before = path.stat().st_ino
    write_secret_file(path, b"new")
    assert path.read_bytes() == b"new"
    assert path.stat().st_ino != before  # renamed over, never rewritten in place
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret"]


def test_write_secret_file_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="writable"):
        write_secret_file(tmp_path / "no" / "secret", b"x")


def test_write_secret_file_cleans_up_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "dir"
    target.mkdir()
    (target / "inside").write_bytes(b"")
    with pytest.raises(KeyFileError):
        write_secret_file(target, b"x")  # cannot rename a file over a non-empty directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"]


# --- generation and fingerprints -------------------------------------------------------


def test_generate_key() -> None:
    assert generate_key().bits == 256
    assert len(generate_key(128).material) == 16
    assert generate_key() != generate_key()
    with pytest.raises(ValueError):
        generate_key(192)


def test_encode_hex_key_round_trip(tmp_path: Path) -> None:
    for key in (generate_key(128), generate_key(256)):
        write_secret_file(tmp_path / "k", encode_hex_key(key))
        assert load_key(tmp_path / "k", kind="hex") == key
        assert load_key(tmp_path / "k") == key


def test_key_fingerprint() -> None:
    key = AesKey(RAW32)
    fp = key_fingerprint(key)
    assert len(fp) == 16 and int(fp, 16) >= 0 and fp == fp.lower()
    assert fp == key_fingerprint(AesKey(RAW32))
    assert fp != key_fingerprint(AesKey(RAW16))
    assert fp not in hashlib.sha256(RAW32).hexdigest()  # domain separated
    assert fp not in RAW32.hex()


# --- swtpm's --key syntax (KeySource) --------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "fields"),
    [
        ("file=/k", {"path": "/k", "kind": "auto", "cipher": None, "kdf": None}),
        ("fd=3,format=binary,mode=aes-cbc", {"fd": 3, "kind": "binary", "cipher": "aes-128-cbc"}),
        ("pwdfd=31,mode=aes-256-cbc", {"fd": 31, "kind": "passphrase", "cipher": "aes-256-cbc"}),
        ("pwdfile=/p,kdf=sha512,remove", {"path": "/p", "kdf": "sha512", "remove": True}),
        ("file=/k,format=hex,remove=false", {"kind": "hex", "remove": False}),
    ],
)
def test_key_spec_parses_swtpm_spellings(spec: str, fields: dict[str, object]) -> None:
    source = parse_key_spec(spec)
    for name, value in fields.items():
        assert getattr(source, name) == value, name


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("", "empty"),
        ("mode=aes-256-cbc", "exactly one of"),
        ("file=/a,fd=3", "exactly one of"),
        ("fd=x", "descriptor number"),
        ("file=/k,kdf=sha512", "kdf= applies"),
        ("pwdfd=3,format=hex", "format= applies"),
        ("fd=3,remove", "remove applies"),
        ("file=/k,mode=aes-512", "unknown mode"),
        ("pwdfile=/k,kdf=md5", "unknown kdf"),
        ("file=/k,bogus=1", "unknown option"),
        ("file=/k,mode=aes-cbc,mode=aes-cbc", "twice"),
    ],
)
def test_key_spec_errors_name_the_problem(spec: str, needle: str) -> None:
    with pytest.raises(KeyFileError, match=needle) as info:
        parse_key_spec(spec)
    assert "file=F|fd=N" in str(info.value)


def test_key_from_a_descriptor_is_read_to_its_end_and_closed() -> None:
    r, w = os.pipe()
    os.write(w, RAW32.hex().encode() + b"\n")
    os.close(w)
    key = parse_key_spec(f"fd={r}").resolve()
    assert key.material == RAW32
    with pytest.raises(OSError):
        os.fstat(r)
    with pytest.raises(KeyFileError, match="not open"):
        parse_key_spec(f"fd={r}").resolve()


@pytest.mark.parametrize("bits", [128, 256])
@pytest.mark.parametrize("kdf", ["pbkdf2", "sha512"])
def test_passphrase_derivation_is_found_from_the_state(bits: int, kdf: str) -> None:
    """swtpm does not record kdf or key size: the one that opens the state is chosen."""
    key = derive_passphrase_key(b"pw\n", bits // 8, kdf)  # type: ignore[arg-type]
    state = wrap_file(b"\0state", key)
    assert choose_passphrase_key(b"pw\n", probe=state) == key
    assert choose_passphrase_key(b"pw\n").bits == 128  # swtpm's default with no state
    assert unwrap_file(state, choose_passphrase_key(b"pw\n", probe=state)) == b"\0state"


def test_swtpm_test_vector_kdfs() -> None:
    """docs/protocol.md#keys: sha512 is a SHA-512 prefix; pbkdf2 uses salt "swtpm", 1000."""
    assert (
        derive_passphrase_key(b"mypassword", 16, "sha512").material
        == (hashlib.sha512(b"mypassword").digest()[:16])
    )
    assert derive_passphrase_key(b"mypassword", 32, "pbkdf2").material == hashlib.pbkdf2_hmac(
        "sha512", b"mypassword", b"swtpm", 1000, 32
    )
