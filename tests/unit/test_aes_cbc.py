"""store.aes: AES-CBC of whole blocks through libcrypto, checked against NIST and cryptography."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from vtpmctl.errors import StoreError
from vtpmctl.store import aes

# NIST SP 800-38A, F.2.1 (CBC-AES128.Encrypt) and F.2.5 (CBC-AES256.Encrypt).
IV = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
PLAIN = bytes.fromhex(
    "6bc1bee22e409f96e93d7e117393172a"
    "ae2d8a571e03ac9c9eb76fac45af8e51"
    "30c81c46a35ce411e5fbc1191a0a52ef"
    "f69f2445df4f9b17ad2b417be66c3710"
)
NIST = [
    (
        "2b7e151628aed2a6abf7158809cf4f3c",
        "7649abac8119b246cee98e9b12e9197d"
        "5086cb9b507219ee95db113a917678b2"
        "73bed6b8e3c1743b7116e69e22229516"
        "3ff1caa1681fac09120eca307586e1a7",
    ),
    (
        "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4",
        "f58c4c04d6e5f1ba779eabfb5f7bfbd6"
        "9cfc4e967edb808d679f777bc6702c7d"
        "39f23369a9d9bacfa530e26304231461"
        "b2eb05e2c39be9fcda6c19078c6a9d1b",
    ),
]


@pytest.mark.parametrize(("key", "ciphertext"), NIST)
def test_nist_sp800_38a_cbc_vectors(key: str, ciphertext: str) -> None:
    k, c = bytes.fromhex(key), bytes.fromhex(ciphertext)
    assert aes.cbc_encrypt(k, IV, PLAIN) == c
    assert aes.cbc_decrypt(k, IV, c) == PLAIN


def _reference(key: bytes, iv: bytes, data: bytes, decrypt: bool) -> bytes:
    cipher = Cipher(algorithms.AES(key), modes.CBC(iv))
    op = cipher.decryptor() if decrypt else cipher.encryptor()
    return op.update(data) + op.finalize()


@pytest.mark.parametrize("key_size", [16, 32])
@pytest.mark.parametrize("length", [0, 16, 32, 48, 64, 4096, 4096 + 16, 65536 + 32 * 3])
def test_same_bytes_as_cryptography(key_size: int, length: int) -> None:
    key, iv, data = os.urandom(key_size), os.urandom(16), os.urandom(length)
    ciphertext = aes.cbc_encrypt(key, iv, data)
    assert ciphertext == _reference(key, iv, data, decrypt=False)
    assert aes.cbc_decrypt(key, iv, ciphertext) == data
    # Any whole blocks decrypt as cryptography's do: no padding is checked or removed.
    assert aes.cbc_decrypt(key, iv, data) == _reference(key, iv, data, decrypt=True)


@pytest.mark.parametrize(
    ("key", "iv", "data"),
    [
        (bytes(24), IV, bytes(16)),  # AES-192 is no swtpm cipher
        (bytes(15), IV, bytes(16)),
        (bytes(16), bytes(32), bytes(16)),  # the caller cuts swtpm's key-length IV
        (bytes(16), IV, bytes(15)),
        (bytes(32), IV, bytes(33)),
    ],
)
def test_refuses_what_it_cannot_do_exactly(key: bytes, iv: bytes, data: bytes) -> None:
    with pytest.raises(ValueError):
        aes.cbc_encrypt(key, iv, data)
    with pytest.raises(ValueError):
        aes.cbc_decrypt(key, iv, data)


def test_a_missing_libcrypto_is_one_line_naming_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aes, "_SONAMES", ("libvtpmctl-no-such-crypto.so.9",))
    monkeypatch.setattr(aes, "_lib", [])
    with pytest.raises(StoreError) as err:
        aes.cbc_encrypt(bytes(16), IV, bytes(16))
    message = str(err.value)
    assert "\n" not in message and "libcrypto" in message and "libssl3" in message


def test_encrypted_state_files_need_no_cryptography() -> None:
    """What a daemon that encrypts runs (wrap, unwrap, transfer blobs) imports no
    ``cryptography``: its extension would add megabytes to every such daemon."""
    code = """
import sys
from vtpmctl.store.blob import AesKey, unwrap_file, unwrap_transfer, wrap_file, wrap_transfer
import vtpmctl.device.server.daemon
for size in (16, 32):
    key = AesKey(bytes(range(size)))
    assert unwrap_file(wrap_file(b"state" * 99, key), key) == b"state" * 99
    blob, flags = wrap_transfer(b"s" * 77, state_key=key, keep_state_encryption=True,
                                migration_key=key)
    assert unwrap_transfer(blob, state_flags=flags, state_key=key, migration_key=key) == b"s" * 77
assert not [m for m in sys.modules if m.split(".")[0] == "cryptography"], "cryptography loaded"
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
