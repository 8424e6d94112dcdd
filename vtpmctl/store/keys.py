"""Key files: read them exactly as swtpm's ``--key``/``--migration-key`` do, write them safely.

Sharing swtpm's parsing (docs/protocol.md#keys) means a key file or passphrase file written for one
tool opens the same state with the other. Errors are one line that names the file, the
problem and the fix, and never include any of the file's content.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Literal

from vtpmctl.errors import StoreError
from vtpmctl.model import KeyFormat
from vtpmctl.store.atomic import NoSpaceError, write_atomic
from vtpmctl.store.blob import AesKey

__all__ = [
    "KeyFileError",
    "check_secret_file_mode",
    "encode_hex_key",
    "generate_key",
    "key_fingerprint",
    "load_key",
    "parse_key_bytes",
    "write_secret_file",
]

CipherName = Literal["aes-128-cbc", "aes-256-cbc"]
Kdf = Literal["pbkdf2", "sha512"]

_CIPHER_BYTES: dict[str, int] = {"aes-128-cbc": 16, "aes-256-cbc": 32}
_PBKDF2_SALT = b"swtpm"
_PBKDF2_ITERATIONS = 1000
# Large enough for any passphrase, small enough that pointing at the wrong file is cheap.
_MAX_FILE_BYTES = 64 * 1024
_HEX_KEY = re.compile(rb"\A(?:0x)?([0-9A-Fa-f]{64}|[0-9A-Fa-f]{32})\s*\Z")
_FINGERPRINT_DOMAIN = b"vtpmctl key fingerprint v1\x00"


class KeyFileError(StoreError):
    """A key or passphrase file that cannot be used; the message says how to fix it."""


def _read_secret(path: Path, what: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KeyFileError(
            f"{what} {path} does not exist; create it or give the right path"
        ) from None
    except PermissionError:
        raise KeyFileError(
            f"{what} {path} cannot be read (permission denied); run as its owner or fix its owner"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"{what} {path} cannot be opened: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise KeyFileError(f"{what} {path} is not a regular file; give the path of a file")
        chunks: list[bytes] = []
        size = 0
        while size <= _MAX_FILE_BYTES:
            chunk = os.read(fd, _MAX_FILE_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise KeyFileError(f"{what} {path} cannot be read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if size > _MAX_FILE_BYTES:
        raise KeyFileError(
            f"{what} {path} is larger than {_MAX_FILE_BYTES} bytes; is this really the key file?"
        )
    return b"".join(chunks)


def _cipher_bytes(cipher: str | None) -> int | None:
    if cipher is None:
        return None
    try:
        return _CIPHER_BYTES[cipher]
    except KeyError:
        raise ValueError(f"unknown cipher {cipher!r}; use aes-128-cbc or aes-256-cbc") from None


def _parse_hex(path: Path, data: bytes, want: int | None) -> AesKey | None:
    match = _HEX_KEY.match(data)
    if match is None:
        return None
    material = bytes.fromhex(match.group(1).decode("ascii"))
    if want is not None and len(material) != want:
        raise KeyFileError(
            f"key file {path} holds a {len(material) * 8}-bit hex key but the cipher needs "
            f"{want * 8} bits; use a {want * 2}-digit key or change the cipher"
        )
    return AesKey(material)


def _parse_binary(path: Path, data: bytes, want: int | None) -> AesKey:
    if len(data) not in (16, 32):
        raise KeyFileError(
            f"key file {path} has {len(data)} bytes; a binary key must be exactly 16 or 32 bytes"
        )
    if want is not None and len(data) > want:
        raise KeyFileError(
            f"key file {path} holds a {len(data) * 8}-bit binary key but the cipher is "
            f"aes-{want * 8}-cbc; use a {want}-byte key or aes-256-cbc"
        )
    # A 16-byte file with aes-256-cbc is used as AES-128, as swtpm does, so that state
    # written by swtpm with such a file still opens.
    return AesKey(data)


def load_key(
    path: Path,
    *,
    kind: KeyFormat = KeyFormat.AUTO,
    cipher: CipherName | None = None,
    kdf: Kdf = "pbkdf2",
) -> AesKey:
    """Read a key the way swtpm reads ``file=…,format=hex|binary`` or ``pwdfile=…,kdf=…``.

    ``auto`` means hex if the whole file is an optional ``0x``, 32 or 64 hex digits and
    optional whitespace, else binary if it is 16 or 32 bytes; passphrases are never
    guessed. File permissions are not checked here (see check_secret_file_mode).
    """
    path = Path(path)
    want = _cipher_bytes(cipher)
    if kind == KeyFormat.PASSPHRASE:
        password = _read_secret(path, "passphrase file")
        if not password:
            raise KeyFileError(f"passphrase file {path} is empty; write the passphrase into it")
        length = want if want is not None else 32
        if kdf == "pbkdf2":
            material = hashlib.pbkdf2_hmac(
                "sha512", password, _PBKDF2_SALT, _PBKDF2_ITERATIONS, length
            )
        elif kdf == "sha512":
            material = hashlib.sha512(password).digest()[:length]
        else:
            raise ValueError(f"unknown kdf {kdf!r}; use pbkdf2 or sha512")
        return AesKey(material)

    data = _read_secret(path, "key file")
    if kind == KeyFormat.HEX:
        key = _parse_hex(path, data, want)
        if key is None:
            raise KeyFileError(
                f"key file {path} is not a hex key; it must hold 32 or 64 hex digits, "
                "optionally prefixed by 0x and followed by a newline"
            )
        return key
    if kind == KeyFormat.BINARY:
        return _parse_binary(path, data, want)
    if kind == KeyFormat.AUTO:
        key = _parse_hex(path, data, want)
        if key is not None:
            return key
        if len(data) in (16, 32):
            return _parse_binary(path, data, want)
        raise KeyFileError(
            f"key file {path} is neither a hex key (32 or 64 hex digits) nor a raw 16- or "
            f"32-byte key ({len(data)} bytes); if it holds a passphrase, say so"
        )
    raise ValueError(f"unknown key kind {kind!r}")


def parse_key_bytes(data: bytes, what: str) -> AesKey:
    """A key handed over as bytes (a descriptor, not a file): hex or raw, as ``auto`` reads."""
    key = _parse_hex(Path(what), data, None)
    if key is not None:
        return key
    if len(data) in (16, 32):
        return AesKey(data)
    raise KeyFileError(
        f"{what} is neither a hex key (32 or 64 hex digits) nor a raw 16- or 32-byte key "
        f"({len(data)} bytes)"
    )


def check_secret_file_mode(path: Path) -> None:
    """Refuse secrets that other users could read or replace."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise KeyFileError(f"{path} does not exist; create it or give the right path") from None
    except OSError as exc:
        raise KeyFileError(f"{path} cannot be inspected: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"{path} is not a regular file; give the path of a file")
    me = os.geteuid()
    if st.st_uid != me:
        raise KeyFileError(
            f"{path} is owned by uid {st.st_uid}, not by uid {me}; fix: chown {me} {path}"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise KeyFileError(
            f"{path} is accessible by group or others (mode {mode:04o}); fix: chmod 600 {path}"
        )


def write_secret_file(path: Path, data: bytes) -> None:
    """Write a secret so that it is never visible to others nor half-written after a crash."""
    path = Path(path)
    try:
        write_atomic(path, data, 0o600)
    except NoSpaceError:
        raise
    except OSError as exc:
        raise KeyFileError(
            f"cannot write {path}: {exc.strerror}; check that {path.parent} exists and is writable"
        ) from None


def generate_key(bits: int = 256) -> AesKey:
    """A fresh random key from the OS CSPRNG."""
    if bits not in (128, 256):
        raise ValueError(f"key size must be 128 or 256 bits, not {bits}")
    return AesKey(secrets.token_bytes(bits // 8))


def encode_hex_key(key: AesKey) -> bytes:
    """Key file content that swtpm reads with ``format=hex`` (as does load_key)."""
    return key.material.hex().encode("ascii") + b"\n"


def key_fingerprint(key: AesKey) -> str:
    """A short, non-secret name for a key, to tell "same key?" in metadata without the key.

    Domain-separated so it cannot be confused with any other hash of the key material.
    """
    return hashlib.sha256(_FINGERPRINT_DOMAIN + key.material).hexdigest()[:16]
