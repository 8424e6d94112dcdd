"""AES-CBC on whole blocks through OpenSSL's libcrypto (ctypes), for the state blobs.

Why not ``cryptography``: its extension module maps about 4 MiB more into every
daemon that encrypts, while libtpms (and ``hashlib``) already map libcrypto into
it. No padding is added or removed here: swtpm's format pads to the key length,
which ``store.blob`` does and checks itself, so the data must be whole blocks.
The library is loaded once, on first use (or by ``preload`` where nothing can be
loaded later: after a chroot, under seccomp).
"""

from __future__ import annotations

import ctypes
from ctypes import POINTER, c_char_p, c_int, c_void_p

from vtpmctl.errors import StoreError

# Off `typing` at run time: the zygote preloads this module into every daemon
# (docs/architecture.md, "The zygote").
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["BLOCK", "cbc_decrypt", "cbc_encrypt", "preload"]

BLOCK = 16
# Sonames, not ctypes.util.find_library: that runs `ldconfig -p` in the process.
_SONAMES = ("libcrypto.so.3", "libcrypto.so")
_MAX_LEN = (1 << 31) - 1 - BLOCK  # EVP's lengths are C ints


class _Libcrypto:
    """The few EVP functions used, with their C signatures declared once."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        def fn(name: str, argtypes: list[Any], restype: Any) -> Any:
            f = getattr(lib, name)
            f.argtypes = argtypes
            f.restype = restype
            return f

        self.new = fn("EVP_CIPHER_CTX_new", [], c_void_p)
        self.free = fn("EVP_CIPHER_CTX_free", [c_void_p], None)
        self.aes_128_cbc = fn("EVP_aes_128_cbc", [], c_void_p)
        self.aes_256_cbc = fn("EVP_aes_256_cbc", [], c_void_p)
        # ctx, cipher, engine, key, iv, enc (1 encrypt, 0 decrypt)
        self.init = fn(
            "EVP_CipherInit_ex", [c_void_p, c_void_p, c_void_p, c_char_p, c_char_p, c_int], c_int
        )
        self.set_padding = fn("EVP_CIPHER_CTX_set_padding", [c_void_p, c_int], c_int)
        self.update = fn(
            "EVP_CipherUpdate", [c_void_p, c_void_p, POINTER(c_int), c_char_p, c_int], c_int
        )
        self.final = fn("EVP_CipherFinal_ex", [c_void_p, c_void_p, POINTER(c_int)], c_int)


_lib: list[_Libcrypto] = []  # empty until first use


def _libcrypto() -> _Libcrypto:
    if _lib:
        return _lib[0]
    errors = []
    for name in _SONAMES:
        try:
            lib = ctypes.CDLL(name)
        except OSError as exc:
            errors.append(str(exc))
            continue
        try:
            loaded = _Libcrypto(lib)
        except AttributeError as exc:  # not an OpenSSL 1.1/3 libcrypto
            errors.append(f"{name}: {exc}")
            continue
        _lib.append(loaded)
        return loaded
    raise StoreError(
        "cannot load OpenSSL's libcrypto for state encryption ("
        + "; ".join(errors)
        + "); install OpenSSL's libcrypto (Debian and Ubuntu: the libssl3 package)"
    )


def _cbc(encrypt: bool, key: bytes, iv: bytes, data: bytes) -> bytes:
    if len(key) not in (16, 32):
        raise ValueError(f"an AES key must be 16 or 32 bytes, not {len(key)}")
    if len(iv) != BLOCK:
        raise ValueError(f"a CBC IV must be {BLOCK} bytes, not {len(iv)}")
    if len(data) % BLOCK or len(data) > _MAX_LEN:
        raise ValueError(f"AES-CBC without padding needs whole blocks, not {len(data)} bytes")
    lib = _libcrypto()
    what = "AES-CBC " + ("encryption" if encrypt else "decryption")

    def check(ok: int, name: str) -> None:
        if ok != 1:
            raise StoreError(f"{what}: {name} failed")

    out = ctypes.create_string_buffer(len(data) + BLOCK)
    n, tail = c_int(0), c_int(0)
    ctx = lib.new()
    if not ctx:
        raise StoreError(f"{what}: EVP_CIPHER_CTX_new failed (out of memory?)")
    try:
        cipher = lib.aes_256_cbc() if len(key) == 32 else lib.aes_128_cbc()
        if not cipher:
            raise StoreError(f"{what}: this libcrypto has no AES-{len(key) * 8}-CBC")
        check(lib.init(ctx, cipher, None, key, iv, 1 if encrypt else 0), "EVP_CipherInit_ex")
        check(lib.set_padding(ctx, 0), "EVP_CIPHER_CTX_set_padding")
        check(lib.update(ctx, out, ctypes.byref(n), data, len(data)), "EVP_CipherUpdate")
        check(lib.final(ctx, ctypes.byref(out, n.value), ctypes.byref(tail)), "EVP_CipherFinal_ex")
        size = n.value + tail.value
        if size != len(data):
            raise StoreError(f"{what}: {size} bytes out for {len(data)} in")
        return ctypes.string_at(out, size)
    finally:
        lib.free(ctx)
        ctypes.memset(out, 0, len(out))  # no copy of the plain text is left in this buffer


def cbc_encrypt(key: bytes, iv: bytes, plain: bytes) -> bytes:
    """AES-CBC encryption of whole blocks (a 16- or 32-byte key picks AES-128 or -256)."""
    return _cbc(True, key, iv, plain)


def cbc_decrypt(key: bytes, iv: bytes, ciphertext: bytes) -> bytes:
    """AES-CBC decryption of whole blocks; no padding is checked or removed."""
    return _cbc(False, key, iv, ciphertext)


def preload() -> None:
    """Load libcrypto and run AES once, for a process that can load nothing later
    (a chroot, seccomp) or forks processes that all encrypt (their pages are shared)."""
    for size in (16, 32):
        cbc_encrypt(bytes(size), bytes(BLOCK), bytes(BLOCK))
