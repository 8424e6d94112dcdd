"""Key files: read them exactly as swtpm's ``--key``/``--migration-key`` do, write them safely.

Sharing swtpm's parsing (docs/protocol.md#keys) means a key file or passphrase file written for one
tool opens the same state with the other. The API every program uses: ``parse_key_spec``
(swtpm's ``--key file=|fd=|pwdfile=|pwdfd=,…`` value) gives a ``KeySource``, whose
``resolve`` reads it and returns the ``AesKey``; ``load_key``/``parse_key_bytes`` read
vtpmctl's ``--key-file`` forms; ``derive_passphrase_key`` is swtpm's derivation.
Errors are one line that names the file, the problem and the fix, and never include
any of the file's content.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from vtpmctl.errors import StoreError
from vtpmctl.frozen import Frozen
from vtpmctl.fspath import clean, parent
from vtpmctl.model import KEY_SPEC_METAVAR, KeyFormat
from vtpmctl.store.atomic import NoSpaceError, write_atomic
from vtpmctl.store.blob import AesKey, file_key_bits, file_key_matches

__all__ = [
    "OWN_PASSPHRASE_BITS",
    "SWTPM_PASSPHRASE_BITS",
    "KeyFileError",
    "KeySource",
    "check_secret_file_mode",
    "choose_passphrase_key",
    "derive_passphrase_key",
    "encode_hex_key",
    "generate_key",
    "key_fingerprint",
    "key_pipe",
    "key_pipe_spec",
    "load_key",
    "parse_key_bytes",
    "parse_key_spec",
    "read_bounded",
    "read_secret_fd",
    "write_secret_file",
]

# Off `typing` at run time: the zygote, and so every daemon, would carry it
# (0.4 MiB; docs/architecture.md, "The zygote").
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Literal, TypeVar

    from vtpmctl.fspath import StrPath

    CipherName = Literal["aes-128-cbc", "aes-256-cbc"]
    Kdf = Literal["pbkdf2", "sha512"]
    T = TypeVar("T")

_CIPHER_BYTES: dict[str, int] = {"aes-128-cbc": 16, "aes-256-cbc": 32}
_PBKDF2_SALT = b"swtpm"
_PBKDF2_ITERATIONS = 1000
# Large enough for any passphrase, small enough that pointing at the wrong file is cheap.
_MAX_FILE_BYTES = 64 * 1024
_HEX_DIGITS = frozenset(b"0123456789ABCDEFabcdef")
_FINGERPRINT_DOMAIN = b"vtpmctl key fingerprint v1\x00"
# The key a passphrase makes when no mode is given and no state tells the size:
# vtpmctl's own --key-format passphrase has always made 256-bit keys; swtpm's
# --key syntax (KeySource) follows swtpm, aes-128-cbc.
OWN_PASSPHRASE_BITS = 256
SWTPM_PASSPHRASE_BITS = 128


class KeyFileError(StoreError):
    """A key or passphrase file that cannot be used; the message says how to fix it."""


def _read_secret(path: StrPath, what: str) -> bytes:
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
        data = read_bounded(fd)
    except OSError as exc:
        raise KeyFileError(f"{what} {path} cannot be read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > _MAX_FILE_BYTES:
        raise KeyFileError(
            f"{what} {path} is larger than {_MAX_FILE_BYTES} bytes; is this really the key file?"
        )
    return data


def _cipher_bytes(cipher: str | None) -> int | None:
    if cipher is None:
        return None
    try:
        return _CIPHER_BYTES[cipher]
    except KeyError:
        raise ValueError(f"unknown cipher {cipher!r}; use aes-128-cbc or aes-256-cbc") from None


def _hex_key_digits(data: bytes) -> bytes | None:
    """The digits of a hex key file: an optional 0x, then 32 or 64 hex digits, then
    only ASCII whitespace; None for anything else. Plain string checks, not re: the
    zygote, and so every daemon, would carry re (docs/architecture.md, "The zygote")."""
    digits = data.rstrip()  # bytes.rstrip() strips b" \t\n\r\v\f", what \s is in bytes
    if digits.startswith(b"0x"):
        digits = digits[2:]
    if len(digits) in (32, 64) and all(c in _HEX_DIGITS for c in digits):
        return digits
    return None


def _parse_hex(what: str, data: bytes, want: int | None) -> AesKey | None:
    digits = _hex_key_digits(data)
    if digits is None:
        return None
    material = bytes.fromhex(digits.decode("ascii"))
    if want is not None and len(material) != want:
        raise KeyFileError(
            f"{what} holds a {len(material) * 8}-bit hex key but the cipher needs "
            f"{want * 8} bits; use a {want * 2}-digit key or change the cipher"
        )
    return AesKey(material)


def _parse_binary(what: str, data: bytes, want: int | None) -> AesKey:
    if len(data) not in (16, 32):
        raise KeyFileError(
            f"{what} has {len(data)} bytes; a binary key must be exactly 16 or 32 bytes"
        )
    if want is not None and len(data) > want:
        raise KeyFileError(
            f"{what} holds a {len(data) * 8}-bit binary key but the cipher is "
            f"aes-{want * 8}-cbc; use a {want}-byte key or aes-256-cbc"
        )
    # A 16-byte file with aes-256-cbc is used as AES-128, as swtpm does, so that state
    # written by swtpm with such a file still opens.
    return AesKey(data)


def derive_passphrase_key(password: bytes, length: int = 32, kdf: Kdf = "pbkdf2") -> AesKey:
    """swtpm's ``pwdfile=``/``pwdfd=`` derivation: PBKDF2-HMAC-SHA512 or a SHA-512 prefix."""
    if length not in (16, 32):
        raise ValueError(f"key length must be 16 or 32 bytes, not {length}")
    import hashlib  # here, not at the top: it loads libcrypto, which most commands never use

    if kdf == "pbkdf2":
        return AesKey(
            hashlib.pbkdf2_hmac("sha512", password, _PBKDF2_SALT, _PBKDF2_ITERATIONS, length)
        )
    if kdf == "sha512":
        return AesKey(hashlib.sha512(password).digest()[:length])
    raise ValueError(f"unknown kdf {kdf!r}; use pbkdf2 or sha512")


def parse_key_bytes(
    data: bytes,
    what: str,
    *,
    kind: KeyFormat = KeyFormat.AUTO,
    cipher: CipherName | None = None,
    kdf: Kdf = "pbkdf2",
) -> AesKey:
    """A key from the bytes of a key or passphrase (``what`` names them in errors:
    "key file PATH", "the key on descriptor N").

    ``auto`` means hex if the whole content is an optional ``0x``, 32 or 64 hex digits
    and optional whitespace, else binary if it is 16 or 32 bytes; passphrases are never
    guessed. A passphrase without a cipher gives an OWN_PASSPHRASE_BITS key.
    """
    want = _cipher_bytes(cipher)
    if kind == KeyFormat.PASSPHRASE:
        if not data:
            raise KeyFileError(f"{what} is empty; write the passphrase into it")
        return derive_passphrase_key(data, want or OWN_PASSPHRASE_BITS // 8, kdf)
    if kind == KeyFormat.HEX:
        key = _parse_hex(what, data, want)
        if key is None:
            raise KeyFileError(
                f"{what} is not a hex key; it must hold 32 or 64 hex digits, "
                "optionally prefixed by 0x and followed by a newline"
            )
        return key
    if kind == KeyFormat.BINARY:
        return _parse_binary(what, data, want)
    if kind == KeyFormat.AUTO:
        key = _parse_hex(what, data, want)
        if key is not None:
            return key
        if len(data) in (16, 32):
            return _parse_binary(what, data, want)
        raise KeyFileError(
            f"{what} is neither a hex key (32 or 64 hex digits) nor a raw 16- or "
            f"32-byte key ({len(data)} bytes); if it holds a passphrase, say so"
        )
    raise ValueError(f"unknown key kind {kind!r}")


def load_key(
    path: StrPath,
    *,
    kind: KeyFormat = KeyFormat.AUTO,
    cipher: CipherName | None = None,
    kdf: Kdf = "pbkdf2",
) -> AesKey:
    """Read a key the way swtpm reads ``file=…,format=hex|binary`` or ``pwdfile=…,kdf=…``.

    See parse_key_bytes for the formats. File permissions are not checked here (see
    check_secret_file_mode).
    """
    path = clean(path)
    what = "passphrase file" if kind == KeyFormat.PASSPHRASE else "key file"
    data = _read_secret(path, what)
    return parse_key_bytes(data, f"{what} {path}", kind=kind, cipher=cipher, kdf=kdf)


def check_secret_file_mode(path: StrPath) -> None:
    """Refuse secrets that other users could read or replace."""
    path = clean(path)
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


def write_secret_file(path: StrPath, data: bytes) -> None:
    """Write a secret so that it is never visible to others nor half-written after a crash."""
    path = clean(path)
    try:
        write_atomic(path, data, 0o600)
    except NoSpaceError:
        raise
    except OSError as exc:
        raise KeyFileError(
            f"cannot write {path}: {exc.strerror}; check that {parent(path)} exists and is writable"
        ) from None


def generate_key(bits: int = 256) -> AesKey:
    """A fresh random key from the OS CSPRNG."""
    if bits not in (128, 256):
        raise ValueError(f"key size must be 128 or 256 bits, not {bits}")
    return AesKey(os.urandom(bits // 8))  # what secrets.token_bytes returns


def encode_hex_key(key: AesKey) -> bytes:
    """Key file content that swtpm reads with ``format=hex`` (as does load_key)."""
    return key.material.hex().encode("ascii") + b"\n"


def key_fingerprint(key: AesKey) -> str:
    """A short, non-secret name for a key, to tell "same key?" in metadata without the key.

    Domain-separated so it cannot be confused with any other hash of the key material.
    """
    import hashlib

    return hashlib.sha256(_FINGERPRINT_DOMAIN + key.material).hexdigest()[:16]


# ---------------------------------------------------------------- key sources
#
# swtpm's ``--key``/``--migration-key`` value, which vtpmctl's ``--key`` and
# ``--migration-key`` take too (docs/protocol.md#keys):
#   file=PATH | fd=N | pwdfile=PATH | pwdfd=N
#   [,format=hex|binary] [,mode=aes-cbc|aes-128-cbc|aes-256-cbc] [,kdf=sha512|pbkdf2] [,remove]

_MODES: dict[str, CipherName] = {
    "aes-cbc": "aes-128-cbc",
    "aes-128-cbc": "aes-128-cbc",
    "aes-256-cbc": "aes-256-cbc",
}
_SOURCES = ("file", "fd", "pwdfile", "pwdfd")


class KeySource(Frozen):
    """Where a key comes from and how to read it; holds no secret.

    ``cipher`` and ``kdf`` are None when not given: a passphrase's key size and
    derivation are then taken from the state it must open (``resolve``'s probe),
    else ``default_bits`` and pbkdf2 (swtpm's defaults).
    """

    __slots__ = ("path", "fd", "kind", "cipher", "kdf", "remove")
    path: str | None
    fd: int | None
    kind: KeyFormat
    cipher: CipherName | None
    kdf: Kdf | None
    remove: bool

    def __init__(
        self,
        path: StrPath | None = None,
        fd: int | None = None,
        kind: KeyFormat = KeyFormat.AUTO,
        cipher: CipherName | None = None,
        kdf: Kdf | None = None,
        remove: bool = False,
    ) -> None:
        self._init(
            path=None if path is None else clean(path),
            fd=fd,
            kind=kind,
            cipher=cipher,
            kdf=kdf,
            remove=remove,
        )

    @property
    def where(self) -> str:
        """How errors name it: "key file PATH", "the passphrase on descriptor N"."""
        what = "passphrase" if self.kind == KeyFormat.PASSPHRASE else "key"
        if self.fd is not None:
            return f"the {what} on descriptor {self.fd}"
        return f"{what} file {self.path}"

    def read(self) -> bytes:
        """The secret bytes (key or passphrase); a descriptor is read to its end and closed."""
        what = "passphrase" if self.kind == KeyFormat.PASSPHRASE else "key"
        if self.fd is not None:
            data = read_secret_fd(self.fd, what)
        else:
            assert self.path is not None
            data = _read_secret(self.path, f"{what} file")
            if self.remove:
                try:
                    os.unlink(self.path)
                except OSError as exc:
                    raise KeyFileError(
                        f"cannot remove {what} file {self.path} (remove was asked): {exc.strerror}"
                    ) from None
        return data

    def resolve(
        self, probe: bytes | None = None, default_bits: int = SWTPM_PASSPHRASE_BITS
    ) -> AesKey:
        """Read and parse the key; ``probe`` is a state file it must open, if any.

        For a passphrase whose mode or kdf is not given, the derivation that opens
        ``probe`` is chosen (swtpm does not record it); with no probe, or none that
        opens it, ``default_bits`` and pbkdf2.
        """
        data = self.read()
        if self.kind != KeyFormat.PASSPHRASE:
            return parse_key_bytes(data, self.where, kind=self.kind, cipher=self.cipher)
        if not data:
            raise KeyFileError(f"{self.where} is empty; give the passphrase")
        return choose_passphrase_key(
            data, cipher=self.cipher, kdf=self.kdf, probe=probe, default_bits=default_bits
        )


def choose_passphrase_key(
    password: bytes,
    *,
    cipher: CipherName | None = None,
    kdf: Kdf | None = None,
    probe: bytes | None = None,
    default_bits: int = SWTPM_PASSPHRASE_BITS,
) -> AesKey:
    """The derivation of ``password`` that opens ``probe``, or the defaults."""
    want = _cipher_bytes(cipher)
    default = derive_passphrase_key(password, want or default_bits // 8, kdf or "pbkdf2")
    if probe is None or (want is not None and kdf is not None):
        return default
    named = file_key_bits(probe)
    lengths = [want] if want else ([named // 8] if named else [16, 32])
    kdfs: list[Kdf] = [kdf] if kdf else ["pbkdf2", "sha512"]
    for length in lengths:
        for name in kdfs:
            key = derive_passphrase_key(password, length, name)
            if file_key_matches(probe, key):
                return key
    return default


def parse_key_spec(text: str, option: str = "--key") -> KeySource:
    """swtpm's ``--key`` value as a KeySource; KeyFileError names what is wrong."""

    def bad(problem: str) -> KeyFileError:
        return KeyFileError(f"{option} {text!r}: {problem}; use {KEY_SPEC_METAVAR}")

    fields = _spec_fields(text, bad)
    sources = [name for name in _SOURCES if name in fields]
    if len(sources) != 1:
        raise bad("give exactly one of file=, fd=, pwdfile=, pwdfd=")
    source = sources[0]
    password = source.startswith("pwd")
    if "kdf" in fields and not password:
        raise bad("kdf= applies to pwdfile= and pwdfd= only")
    if "format" in fields and password:
        raise bad("format= applies to file= and fd= only")
    fd = path = None
    if source.endswith("fd"):
        value = fields[source]
        if not value.isdigit() or int(value) > 65535:
            raise bad(f"{source}= needs a descriptor number, not {value!r}")
        fd = int(value)
        if "remove" in fields:
            raise bad("remove applies to file= and pwdfile= only")
    else:
        path = clean(fields[source])
    kind = _spec_choice(fields, "format", _FORMATS, bad)
    if kind is None:
        kind = KeyFormat.PASSPHRASE if password else KeyFormat.AUTO
    return KeySource(
        path=path,
        fd=fd,
        kind=kind,
        cipher=_spec_choice(fields, "mode", _MODES, bad),
        kdf=_spec_choice(fields, "kdf", _KDFS, bad),
        remove=fields.get("remove", "false") == "true",
    )


_FORMATS = {"hex": KeyFormat.HEX, "binary": KeyFormat.BINARY}
_KDFS: dict[str, Kdf] = {"pbkdf2": "pbkdf2", "sha512": "sha512"}


def _spec_fields(text: str, bad: Callable[[str], KeyFileError]) -> dict[str, str]:
    items = [item for item in text.split(",") if item]
    if not items:
        raise bad("empty")
    fields: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if name == "remove" and value in ("", "true", "false"):
            value = value or "true"
        elif not sep or not value:
            raise bad(f"{item!r} has no value")
        if name in fields:
            raise bad(f"{name}= given twice")
        fields[name] = value
    unknown = sorted(set(fields) - {*_SOURCES, "format", "mode", "kdf", "remove"})
    if unknown:
        raise bad(f"unknown option {unknown[0]}=")
    return fields


def _spec_choice(
    fields: dict[str, str], name: str, table: dict[str, T], bad: Callable[[str], KeyFileError]
) -> T | None:
    if name not in fields:
        return None
    try:
        return table[fields[name]]
    except KeyError:
        raise bad(f"unknown {name} {fields[name]!r} ({' or '.join(table)})") from None


def read_secret_fd(fd: int, what: str = "key") -> bytes:
    """All bytes of an inherited descriptor (pipe or file), which is then closed."""
    try:
        st = os.fstat(fd)
    except OSError:
        raise KeyFileError(
            f"{what} descriptor {fd} is not open; pass it to this process (e.g. {fd}<FILE)"
        ) from None
    if stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise KeyFileError(f"{what} descriptor {fd} is a directory; pass a file or a pipe")
    try:
        data = read_bounded(fd)
    except OSError as exc:
        raise KeyFileError(f"{what} descriptor {fd} cannot be read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > _MAX_FILE_BYTES:
        raise KeyFileError(f"{what} descriptor {fd} gave more than {_MAX_FILE_BYTES} bytes")
    return data


def read_bounded(fd: int) -> bytes:
    """Read to EOF but at most one byte past the limit, so callers can tell "too big"."""
    chunks: list[bytes] = []
    size = 0
    while size <= _MAX_FILE_BYTES:
        chunk = os.read(fd, _MAX_FILE_BYTES + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def key_pipe(key: AesKey) -> int:
    """A pipe's read end that yields ``key`` in binary, for a child to read with
    ``fd=N,format=binary``: the key reaches it without a file or its command line."""
    r, w = os.pipe()
    try:
        os.write(w, key.material)  # 16 or 32 bytes: always fits the pipe buffer
    finally:
        os.close(w)
    return r


def key_pipe_spec(fd: int, key: AesKey) -> str:
    """The ``--key`` value for a key_pipe descriptor."""
    return f"fd={fd},format=binary,mode={key.cipher}"
