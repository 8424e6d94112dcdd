"""vtpmctl.store.keys: which files are hex keys, against the pattern the plain checks replaced."""

from __future__ import annotations

import random
import re

import pytest

from vtpmctl.store.keys import _hex_key_digits

# The pattern keys.py used before: the plain checks must accept exactly what it accepts.
OLD_HEX_KEY = re.compile(rb"\A(?:0x)?([0-9A-Fa-f]{64}|[0-9A-Fa-f]{32})\s*\Z")

H32 = b"00112233445566778899aabbccddeeff"
H64 = b"0123456789abcdefABCDEF" * 2 + b"00112233445566778899"
# Bytes mode: \s is these six and nothing else (not NEL, NBSP or the separators 0x1c-0x1f).
ASCII_SPACE = b" \t\n\r\x0b\x0c"
NOT_SPACE = b"\x85\xa0\x1c\x1d\x1e\x1f\x00"


def _cases() -> list[bytes]:
    out = [b"", b"0x", b"0X", b"x", b"\n", b" ", H32[:1]]
    for body in (H32, H64, H32.upper(), H64.lower()):
        for n in (-2, -1, 0, 1, 2):
            digits = body[: len(body) + n] if n <= 0 else body + body[:n]
            for prefix in (b"", b"0x", b"0X", b"x", b"0x0x", b" ", b"\t", b"00x", b"0"):
                for suffix in (b"", b" ", b"\n", b"  \n\n", b"\r\n", b"\x0b\x0c", b"\t "):
                    out.append(prefix + digits + suffix)
        out += [body + bytes([c]) for c in ASCII_SPACE + NOT_SPACE]
        out += [bytes([c]) + body for c in ASCII_SPACE + NOT_SPACE]
        out += [body[:10] + bytes([c]) + body[11:] for c in b" gGxX-+\x00\xff"]
        out += [body + b" x", body + b"\n0", body[:16] + b" " + body[16:], body + body[:32]]
    arabic_three = "\u0663".encode()  # '٣': a digit to str's \d, two bytes here
    fullwidth_a = "\uff21".encode()  # 'Ａ'
    for odd in (arabic_three, fullwidth_a, "é".encode(), "\u00a0".encode(), "\u2003".encode()):
        out += [H32[:-1] + odd, H32[:-2] + odd, H32 + odd, odd + H32, H64[:-2] + odd]
    return out


@pytest.mark.parametrize("data", _cases())
def test_hex_key_acceptance_is_the_old_patterns(data: bytes) -> None:
    match = OLD_HEX_KEY.match(data)
    assert _hex_key_digits(data) == (match.group(1) if match else None)


def test_hex_key_acceptance_on_random_files() -> None:
    """Random files near the accepted shape: every byte value, every boundary."""
    rng = random.Random(1234)
    alphabet = b"0123456789abcdefABCDEFxX \t\n\r\x0b\x0c\x1c\x85\xa0gG\x00\xff"
    for _ in range(20000):
        body = bytes(rng.choice(alphabet[:22]) for _ in range(rng.choice((31, 32, 33, 63, 64, 65))))
        noise = bytes(rng.choice(alphabet) for _ in range(rng.randrange(3)))
        data = rng.choice((b"", b"0x", b"0X", noise)) + body + rng.choice((b"", noise))
        if rng.random() < 0.2:
            at = rng.randrange(len(data))
            data = data[:at] + bytes([rng.randrange(256)]) + data[at + 1 :]
        match = OLD_HEX_KEY.match(data)
        assert _hex_key_digits(data) == (match.group(1) if match else None), data


@pytest.mark.parametrize("prefix", [b"", b"0x"])
def test_every_byte_after_and_inside_a_key(prefix: bytes) -> None:
    """Each of the 256 byte values as trailing space, and in place of a digit."""
    for c in range(256):
        for data in (prefix + H32 + bytes([c]), prefix + H64[:-1] + bytes([c]), bytes([c]) + H32):
            match = OLD_HEX_KEY.match(data)
            assert _hex_key_digits(data) == (match.group(1) if match else None), data
