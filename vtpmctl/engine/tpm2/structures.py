"""TPM 2.0 structures the commands carry: public areas, schemes, PCR selections."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from vtpmctl.engine.tpm2.constants import Alg
from vtpmctl.engine.tpm2.marshal import Reader, tpm2b, u8, u16, u32
from vtpmctl.engine.tpm2.rc import MalformedResponse


@dataclass(frozen=True)
class SymDef:
    """TPMT_SYM_DEF_OBJECT; algorithm NULL means "no symmetric key"."""

    algorithm: int = Alg.NULL
    key_bits: int = 0
    mode: int = Alg.NULL

    def marshal(self) -> bytes:
        if self.algorithm == Alg.NULL:
            return u16(Alg.NULL)
        if self.algorithm == Alg.XOR:
            return u16(self.algorithm) + u16(self.key_bits)  # key_bits holds the hash
        return u16(self.algorithm) + u16(self.key_bits) + u16(self.mode)

    @classmethod
    def read(cls, r: Reader) -> SymDef:
        alg = r.u16()
        if alg == Alg.NULL:
            return cls()
        if alg == Alg.XOR:
            return cls(alg, r.u16())
        return cls(alg, r.u16(), r.u16())


# Schemes whose details are empty; ECDAA adds a count after the hash.
_NO_DETAIL = {Alg.NULL, Alg.RSAES}


@dataclass(frozen=True)
class Scheme:
    """A signing/encryption/KDF scheme: the algorithm and, for most, a hash."""

    algorithm: int = Alg.NULL
    hash_alg: int = Alg.NULL
    count: int = 0

    def marshal(self) -> bytes:
        if self.algorithm in _NO_DETAIL:
            return u16(self.algorithm)
        out = u16(self.algorithm) + u16(self.hash_alg)
        if self.algorithm == Alg.ECDAA:
            out += u16(self.count)
        return out

    @classmethod
    def read(cls, r: Reader) -> Scheme:
        alg = r.u16()
        if alg in _NO_DETAIL:
            return cls(alg)
        h = r.u16()
        return cls(alg, h, r.u16() if alg == Alg.ECDAA else 0)


_HASHES: dict[int, str] = {
    Alg.SHA1: "sha1",
    Alg.SHA256: "sha256",
    Alg.SHA384: "sha384",
    Alg.SHA512: "sha512",
    Alg.SHA3_256: "sha3_256",
    Alg.SHA3_384: "sha3_384",
    Alg.SHA3_512: "sha3_512",
}


def hash_name(alg: int) -> str:
    """hashlib name of a TPM hash algorithm."""
    try:
        return _HASHES[alg]
    except KeyError:
        raise ValueError(f"unsupported hash algorithm 0x{alg:04x}") from None


@dataclass(frozen=True)
class Public:
    """TPMT_PUBLIC for RSA, ECC, KEYEDHASH and SYMCIPHER objects.

    Kept as plain fields so a template can be compared field by field with a
    key another tool created, without caring about the key itself.
    """

    type: int
    name_alg: int
    attributes: int
    auth_policy: bytes = b""
    symmetric: SymDef = field(default_factory=SymDef)
    scheme: Scheme = field(default_factory=Scheme)
    key_bits: int = 0
    """RSA modulus size."""
    exponent: int = 0
    """RSA public exponent; 0 means 65537."""
    curve: int = 0
    """ECC curve (TPM_ECC_CURVE)."""
    kdf: Scheme = field(default_factory=Scheme)
    """ECC KDF, or the KDF of a KEYEDHASH XOR scheme."""
    unique: bytes = b""
    """RSA modulus, or the KEYEDHASH/SYMCIPHER unique digest."""
    unique_x: bytes = b""
    unique_y: bytes = b""

    def marshal(self) -> bytes:
        out = u16(self.type) + u16(self.name_alg) + u32(self.attributes) + tpm2b(self.auth_policy)
        if self.type == Alg.RSA:
            out += self.symmetric.marshal() + self.scheme.marshal()
            out += u16(self.key_bits) + u32(self.exponent) + tpm2b(self.unique)
        elif self.type == Alg.ECC:
            out += self.symmetric.marshal() + self.scheme.marshal()
            out += u16(self.curve) + self.kdf.marshal()
            out += tpm2b(self.unique_x) + tpm2b(self.unique_y)
        elif self.type == Alg.KEYEDHASH:
            out += u16(self.scheme.algorithm)
            if self.scheme.algorithm == Alg.HMAC:
                out += u16(self.scheme.hash_alg)
            elif self.scheme.algorithm == Alg.XOR:
                out += u16(self.scheme.hash_alg) + u16(self.kdf.algorithm)
            out += tpm2b(self.unique)
        elif self.type == Alg.SYMCIPHER:
            out += self.symmetric.marshal() + tpm2b(self.unique)
        else:
            raise ValueError(f"unsupported object type 0x{self.type:04x}")
        return out

    @classmethod
    def read(cls, r: Reader) -> Public:
        typ, name_alg, attrs, policy = r.u16(), r.u16(), r.u32(), r.tpm2b()
        base = cls(typ, name_alg, attrs, policy)
        if typ == Alg.RSA:
            sym, sch = SymDef.read(r), Scheme.read(r)
            bits, exp = r.u16(), r.u32()
            return replace(
                base, symmetric=sym, scheme=sch, key_bits=bits, exponent=exp, unique=r.tpm2b()
            )
        if typ == Alg.ECC:
            sym, sch = SymDef.read(r), Scheme.read(r)
            curve, kdf = r.u16(), Scheme.read(r)
            x, y = r.tpm2b(), r.tpm2b()
            return replace(
                base, symmetric=sym, scheme=sch, curve=curve, kdf=kdf, unique_x=x, unique_y=y
            )
        if typ == Alg.KEYEDHASH:
            alg = r.u16()
            sch, kdf = Scheme(alg), Scheme()
            if alg == Alg.HMAC:
                sch = Scheme(alg, r.u16())
            elif alg == Alg.XOR:
                sch = Scheme(alg, r.u16())
                kdf = Scheme(r.u16())
            return replace(base, scheme=sch, kdf=kdf, unique=r.tpm2b())
        if typ == Alg.SYMCIPHER:
            return replace(base, symmetric=SymDef.read(r), unique=r.tpm2b())
        raise MalformedResponse(f"unsupported object type 0x{typ:04x}")

    @classmethod
    def parse(cls, data: bytes) -> Public:
        """Parse a marshaled TPMT_PUBLIC (no size prefix); trailing bytes are an error."""
        r = Reader(data)
        pub = cls.read(r)
        r.end()
        return pub

    def name(self) -> bytes:
        """The TPM Name: nameAlg followed by the hash of the public area."""
        return u16(self.name_alg) + hashlib.new(hash_name(self.name_alg), self.marshal()).digest()

    def template(self) -> Public:
        """The same object with the key removed, for comparing templates."""
        return replace(self, unique=b"", unique_x=b"", unique_y=b"")


def marshal_pcr_selection(selection: Mapping[int, Iterable[int]]) -> bytes:
    """TPML_PCR_SELECTION from {hash alg: PCR numbers}; at least 3 bitmap bytes."""
    out = u32(len(selection))
    for alg, pcrs in selection.items():
        nums = sorted(set(pcrs))
        size = max(3, (nums[-1] // 8 + 1) if nums else 0)
        bitmap = bytearray(size)
        for p in nums:
            bitmap[p // 8] |= 1 << (p % 8)
        out += u16(alg) + u8(size) + bytes(bitmap)
    return out


def read_pcr_selection(r: Reader) -> dict[int, list[int]]:
    """Inverse of marshal_pcr_selection (bank order is kept)."""
    out: dict[int, list[int]] = {}
    for _ in range(r.u32()):
        alg = r.u16()
        bitmap = r.take(r.u8())
        out[alg] = [i * 8 + b for i, byte in enumerate(bitmap) for b in range(8) if byte >> b & 1]
    return out


@dataclass(frozen=True)
class NvPublic:
    """TPMS_NV_PUBLIC plus the index's Name."""

    index: int
    name_alg: int
    attributes: int
    auth_policy: bytes
    data_size: int
    name: bytes = b""

    def marshal(self) -> bytes:
        return (
            u32(self.index)
            + u16(self.name_alg)
            + u32(self.attributes)
            + tpm2b(self.auth_policy)
            + u16(self.data_size)
        )
