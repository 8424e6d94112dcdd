"""Raw TPM 1.2 commands, each declared once as a field table.

swtpm_setup manufactures a TPM 1.2 with a handful of commands (physical presence,
enable, the EK, ownership, NV certificates and the NV lock). Each command is one
``Command`` row: its ordinal and the fields of its request and response, so the bytes
sent and the bytes read come from the same declaration. Structures (TPM_KEY_PARMS,
TPM_KEY12, TPM_NV_DATA_PUBLIC …) are field tables too and nest. Numbers and layouts
are those of the TCG TPM Main Specification 1.2 rev 116, Part 2 and Part 3.

Authorised commands use an OIAP session: ``execute(…, auth=secret)`` opens one, adds
the HMAC over the parameters and checks the TPM's HMAC on the answer.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Union

from vtpmctl.device.protocol import (
    TPM12_TAG_RQU_COMMAND,
    TPM12_TAG_RSP_COMMAND,
    TPM_HEADER,
    TPM_HEADER_SIZE,
)
from vtpmctl.engine.tpm2.marshal import Reader, Transact
from vtpmctl.engine.tpm2.rc import MalformedResponse, TpmError

# The header and the unauthorised tags are the data channel's (device.protocol).
TAG_RQU_AUTH1_COMMAND = 0x00C2
TAG_RSP_AUTH1_COMMAND = 0x00C5
DIGEST_SIZE = 20


class Ord(IntEnum):
    """TPM_ORD values vtpmctl sends."""

    OIAP = 0x0000000A
    TAKE_OWNERSHIP = 0x0000000D
    GET_CAPABILITY = 0x00000065
    PHYSICAL_ENABLE = 0x0000006F
    PHYSICAL_SET_DEACTIVATED = 0x00000072
    CREATE_ENDORSEMENT_KEY_PAIR = 0x00000078
    READ_PUBEK = 0x0000007C
    OWNER_READ_INTERNAL_PUB = 0x00000081
    NV_DEFINE_SPACE = 0x000000CC
    NV_WRITE_VALUE = 0x000000CD
    NV_READ_VALUE = 0x000000CF
    TSC_PHYSICAL_PRESENCE = 0x4000000A


# TSC_PhysicalPresence bits: allow the command form, then assert presence.
PHYSICAL_PRESENCE_CMD_ENABLE = 0x0020
PHYSICAL_PRESENCE_PRESENT = 0x0008

# Structure tags, algorithms, schemes and key kinds.
TAG_KEY12 = 0x0028
TAG_NV_ATTRIBUTES = 0x0017
TAG_NV_DATA_PUBLIC = 0x0018
ALG_RSA = 0x00000001
ES_RSAESOAEP_SHA1_MGF1 = 0x0003
SS_NONE = 0x0001
SS_RSASSAPKCS1V15_SHA1 = 0x0002
KEY_STORAGE = 0x0011
AUTH_ALWAYS = 0x01
PID_OWNER = 0x0005
KH_EK = 0x40000006
LOC_ALL = 0x1F
OAEP_LABEL = b"TCPA"  # the encoding parameter of every OAEP the TPM 1.2 decrypts

# TPM_GetCapability areas.
CAP_NV_LIST = 0x0000000D
CAP_NV_INDEX = 0x00000011

# NV indices swtpm_setup defines (with the D bit: only definable before the NV lock).
NV_INDEX_D_BIT = 0x10000000
NV_INDEX_EK_CERT = NV_INDEX_D_BIT | 0x0000F000
NV_INDEX_PLATFORM_CERT = NV_INDEX_D_BIT | 0x0000F002
NV_INDEX_LOCK = 0xFFFFFFFF  # defining it (size 0) sets nvLocked
NV_PER_OWNERREAD = 0x00020000
NV_PER_OWNERWRITE = 0x00000002

# TCG PC Client: a certificate in TPM 1.2 NV is TCG_PCCLIENT_STORED_CERT (tag, full-cert
# type, size) around TCG_FULL_CERT (tag, DER); the size counts the inner tag.
TAG_PCCLIENT_STORED_CERT = 0x1001
TAG_PCCLIENT_FULL_CERT = 0x1002
FULL_CERT = 0
STORED_CERT_HEAD = struct.Struct(">HBHH")

# Field kinds: struct codes for fixed fields, SIZED for a UINT32 size and its bytes,
# or a nested Fields table.
SIZED = "sized"
Kind = Union[str, "Fields"]


@dataclass(frozen=True)
class Fields:
    """An ordered table of (name, kind): packs a mapping, reads it back."""

    fields: tuple[tuple[str, Kind], ...]

    def pack(self, values: Mapping[str, Any]) -> bytes:
        out = b""
        for name, kind in self.fields:
            value = values[name]
            if isinstance(kind, Fields):
                out += kind.pack(value)
            elif kind == SIZED:
                out += struct.pack(">I", len(value)) + bytes(value)
            else:
                out += struct.pack(">" + kind, value)
        return out

    def read(self, r: Reader) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, kind in self.fields:
            if isinstance(kind, Fields):
                values[name] = kind.read(r)
            elif kind == SIZED:
                values[name] = r.take(r.u32())
            else:
                values[name] = struct.unpack(">" + kind, r.take(struct.calcsize(">" + kind)))[0]
        return values

    def size(self) -> int:
        """The byte size of a table without variable fields."""
        total = 0
        for _, kind in self.fields:
            if isinstance(kind, Fields):
                total += kind.size()
            elif kind == SIZED:
                raise ValueError("a table with variable fields has no fixed size")
            else:
                total += struct.calcsize(">" + kind)
        return total

    def parse(self, data: bytes) -> dict[str, Any]:
        r = Reader(data)
        values = self.read(r)
        r.end()
        return values


def F(*fields: tuple[str, Kind]) -> Fields:  # noqa: N802 - a table constructor
    return Fields(tuple(fields))


NONE = F()
RSA_KEY_PARMS = F(("key_length", "I"), ("num_primes", "I"), ("exponent", SIZED))
KEY_PARMS = F(("algorithm", "I"), ("enc_scheme", "H"), ("sig_scheme", "H"), ("parms", SIZED))
STORE_PUBKEY = F(("key", SIZED))
PUBKEY = F(("parms", KEY_PARMS), ("key", STORE_PUBKEY))
KEY12 = F(
    ("tag", "H"),
    ("fill", "H"),
    ("usage", "H"),
    ("flags", "I"),
    ("auth_usage", "B"),
    ("parms", KEY_PARMS),
    ("pcr_info", SIZED),
    ("key", STORE_PUBKEY),
    ("enc_data", SIZED),
)
PCR_INFO_SHORT = F(("select_size", "H"), ("pcrs", "3s"), ("locality", "B"), ("digest", "20s"))
NV_ATTRIBUTES = F(("tag", "H"), ("attributes", "I"))
NV_DATA_PUBLIC = F(
    ("tag", "H"),
    ("index", "I"),
    ("read_pcr", PCR_INFO_SHORT),
    ("write_pcr", PCR_INFO_SHORT),
    ("permission", NV_ATTRIBUTES),
    ("read_st_clear", "B"),
    ("write_st_clear", "B"),
    ("write_define", "B"),
    ("size", "I"),
)
# The trailer an OIAP-authorised command carries, and the one its answer carries.
AUTH_IN = F(("handle", "I"), ("nonce_odd", "20s"), ("continue", "B"), ("hmac", "20s"))
AUTH_OUT = F(("nonce_even", "20s"), ("continue", "B"), ("hmac", "20s"))


@dataclass(frozen=True)
class Command:
    """One TPM 1.2 command: what goes after the header, what comes back."""

    ordinal: Ord
    request: Fields
    response: Fields
    auth: bool = False


TSC_PHYSICAL_PRESENCE = Command(Ord.TSC_PHYSICAL_PRESENCE, F(("bits", "H")), NONE)
PHYSICAL_ENABLE = Command(Ord.PHYSICAL_ENABLE, NONE, NONE)
PHYSICAL_SET_DEACTIVATED = Command(Ord.PHYSICAL_SET_DEACTIVATED, F(("state", "B")), NONE)
CREATE_ENDORSEMENT_KEY_PAIR = Command(
    Ord.CREATE_ENDORSEMENT_KEY_PAIR,
    F(("anti_replay", "20s"), ("parms", KEY_PARMS)),
    F(("pubkey", PUBKEY), ("checksum", "20s")),
)
READ_PUBEK = Command(
    Ord.READ_PUBEK, F(("anti_replay", "20s")), F(("pubkey", PUBKEY), ("checksum", "20s"))
)
OIAP = Command(Ord.OIAP, NONE, F(("handle", "I"), ("nonce_even", "20s")))
TAKE_OWNERSHIP = Command(
    Ord.TAKE_OWNERSHIP,
    F(("protocol", "H"), ("owner_auth", SIZED), ("srk_auth", SIZED), ("srk", KEY12)),
    F(("srk", KEY12)),
    auth=True,
)
OWNER_READ_INTERNAL_PUB = Command(
    Ord.OWNER_READ_INTERNAL_PUB, F(("handle", "I")), F(("pubkey", PUBKEY)), auth=True
)
NV_DEFINE_SPACE = Command(
    Ord.NV_DEFINE_SPACE, F(("public", NV_DATA_PUBLIC), ("enc_auth", "20s")), NONE
)
NV_WRITE_VALUE = Command(
    Ord.NV_WRITE_VALUE, F(("index", "I"), ("offset", "I"), ("data", SIZED)), NONE
)
NV_READ_VALUE = Command(
    Ord.NV_READ_VALUE, F(("index", "I"), ("offset", "I"), ("size", "I")), F(("data", SIZED))
)
NV_READ_VALUE_OWNER = Command(
    NV_READ_VALUE.ordinal, NV_READ_VALUE.request, NV_READ_VALUE.response, auth=True
)
GET_CAPABILITY = Command(Ord.GET_CAPABILITY, F(("area", "I"), ("sub", SIZED)), F(("answer", SIZED)))


# ---------------------------------------------------------------- framing


def build(command: Command, values: Mapping[str, Any], trailer: bytes = b"") -> bytes:
    """Header, parameters and (for an authorised command) the OIAP trailer."""
    body = command.request.pack(values) + trailer
    tag = TAG_RQU_AUTH1_COMMAND if trailer else TPM12_TAG_RQU_COMMAND
    head = {"tag": tag, "size": TPM_HEADER_SIZE + len(body), "code": command.ordinal}
    return TPM_HEADER.pack("big", head) + body


def _split(command: Command, data: bytes) -> tuple[int, bytes]:
    """(tag, body) of a successful answer; TpmError for a non-zero result."""
    if len(data) < TPM_HEADER_SIZE:
        raise MalformedResponse(f"a {len(data)}-byte answer is shorter than a header")
    head = TPM_HEADER.unpack("big", data)
    tag, size, rc = head["tag"], head["size"], head["code"]
    if size != len(data):
        raise MalformedResponse(f"header says {size} bytes, got {len(data)}")
    if rc:
        raise TpmError(rc, int(command.ordinal))
    if tag not in (TPM12_TAG_RSP_COMMAND, TAG_RSP_AUTH1_COMMAND):
        raise MalformedResponse(f"unexpected response tag 0x{tag:04x}")
    return tag, data[TPM_HEADER_SIZE:]


def parse(command: Command, data: bytes) -> dict[str, Any]:
    """The response fields of an unauthorised command."""
    return command.response.parse(_split(command, data)[1])


def _param_digest(*parts: bytes) -> bytes:
    return hashlib.sha1(b"".join(parts)).digest()


def _auth_hmac(secret: bytes, digest: bytes, even: bytes, odd: bytes, cont: int) -> bytes:
    return hmac.new(secret, digest + even + odd + bytes([cont]), hashlib.sha1).digest()


def execute(
    transact: Transact,
    command: Command,
    values: Mapping[str, Any] | None = None,
    *,
    auth: bytes | None = None,
) -> dict[str, Any]:
    """Send one command and read its answer; ``auth`` is the 20-byte secret of an OIAP.

    Every command here hashes all its parameters into the authorisation (none takes a
    key handle), and the TPM's answer is checked with the same secret.
    """
    values = values or {}
    if not command.auth:
        return parse(command, transact(build(command, values)))
    if auth is None or len(auth) != DIGEST_SIZE:
        raise ValueError(f"{command.ordinal.name} needs a 20-byte authorisation secret")
    session = parse(OIAP, transact(build(OIAP, {})))
    odd = os.urandom(DIGEST_SIZE)
    params = command.request.pack(values)
    ordinal = struct.pack(">I", command.ordinal)
    mac = _auth_hmac(auth, _param_digest(ordinal, params), session["nonce_even"], odd, 0)
    trailer = AUTH_IN.pack(
        {"handle": session["handle"], "nonce_odd": odd, "continue": 0, "hmac": mac}
    )
    _, body = _split(command, transact(build(command, values, trailer)))
    if len(body) < AUTH_OUT.size():
        raise MalformedResponse(f"{command.ordinal.name}: the answer has no authorisation")
    out_params, tail = body[: -AUTH_OUT.size()], AUTH_OUT.parse(body[-AUTH_OUT.size() :])
    digest = _param_digest(b"\0\0\0\0", ordinal, out_params)
    expected = _auth_hmac(auth, digest, tail["nonce_even"], odd, tail["continue"])
    if not hmac.compare_digest(expected, tail["hmac"]):
        raise MalformedResponse(f"{command.ordinal.name}: the answer's authorisation is wrong")
    return command.response.parse(out_params)


# ---------------------------------------------------------------- what swtpm_setup does

EK_BITS = 2048
EK_PRIMES = 2


def _rsa_parms(enc_scheme: int, sig_scheme: int) -> dict[str, Any]:
    """TPM_KEY_PARMS of a 2048-bit RSA key with the default exponent."""
    rsa = {"key_length": EK_BITS, "num_primes": EK_PRIMES, "exponent": b""}
    return {
        "algorithm": ALG_RSA,
        "enc_scheme": enc_scheme,
        "sig_scheme": sig_scheme,
        "parms": RSA_KEY_PARMS.pack(rsa),
    }


def enable(transact: Transact) -> None:
    """What a BIOS does to a new TPM: assert physical presence, enable, activate."""
    for bits in (PHYSICAL_PRESENCE_CMD_ENABLE, PHYSICAL_PRESENCE_PRESENT):
        execute(transact, TSC_PHYSICAL_PRESENCE, {"bits": bits})
    execute(transact, PHYSICAL_ENABLE)
    execute(transact, PHYSICAL_SET_DEACTIVATED, {"state": 0})


def _pubkey_modulus(answer: Mapping[str, Any], anti_replay: bytes) -> bytes:
    """The EK modulus of a ReadPubek/CreateEndorsementKeyPair answer, checksum checked."""
    pubkey = PUBKEY.pack(answer["pubkey"])
    if hashlib.sha1(pubkey + anti_replay).digest() != answer["checksum"]:
        raise MalformedResponse("the EK's checksum does not match its public key")
    return bytes(answer["pubkey"]["key"]["key"])


def create_ek(transact: Transact) -> bytes:
    """TPM_CreateEndorsementKeyPair (RSA 2048, OAEP) as swtpm_setup asks; the modulus."""
    nonce = os.urandom(DIGEST_SIZE)
    # the signature scheme swtpm_setup sends; the TPM records TPM_SS_NONE for its EK
    parms = _rsa_parms(ES_RSAESOAEP_SHA1_MGF1, SS_RSASSAPKCS1V15_SHA1)
    answer = execute(transact, CREATE_ENDORSEMENT_KEY_PAIR, {"anti_replay": nonce, "parms": parms})
    return _pubkey_modulus(answer, nonce)


def read_pubek(transact: Transact) -> bytes:
    """The EK modulus while the TPM has no owner (TPM_ReadPubek)."""
    nonce = os.urandom(DIGEST_SIZE)
    return _pubkey_modulus(execute(transact, READ_PUBEK, {"anti_replay": nonce}), nonce)


def owner_read_ek(transact: Transact, owner_auth: bytes) -> bytes:
    """The EK modulus of an owned TPM (TPM_OwnerReadInternalPub)."""
    answer = execute(transact, OWNER_READ_INTERNAL_PUB, {"handle": KH_EK}, auth=owner_auth)
    return bytes(answer["pubkey"]["key"]["key"])


def oaep_encrypt(modulus: bytes, secret: bytes) -> bytes:
    """``secret`` encrypted to the EK the way the TPM 1.2 decrypts it (OAEP SHA-1, 'TCPA')."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    key = rsa.RSAPublicNumbers(65537, int.from_bytes(modulus, "big")).public_key()
    pad = padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), OAEP_LABEL)  # noqa: S303
    return key.encrypt(secret, pad)


def take_ownership(
    transact: Transact, ek_modulus: bytes, owner_auth: bytes, srk_auth: bytes
) -> None:
    """TPM_TakeOwnership with a 2048-bit storage root key that always needs its secret."""
    srk = {
        "tag": TAG_KEY12,
        "fill": 0,
        "usage": KEY_STORAGE,
        "flags": 0,
        "auth_usage": AUTH_ALWAYS,
        "parms": _rsa_parms(ES_RSAESOAEP_SHA1_MGF1, SS_NONE),
        "pcr_info": b"",
        "key": {"key": b""},
        "enc_data": b"",
    }
    values = {
        "protocol": PID_OWNER,
        "owner_auth": oaep_encrypt(ek_modulus, owner_auth),
        "srk_auth": oaep_encrypt(ek_modulus, srk_auth),
        "srk": srk,
    }
    execute(transact, TAKE_OWNERSHIP, values, auth=owner_auth)


def _no_pcrs() -> dict[str, Any]:
    return {"select_size": 3, "pcrs": b"\0\0\0", "locality": LOC_ALL, "digest": bytes(20)}


def nv_define(transact: Transact, index: int, attributes: int, size: int) -> None:
    """TPM_NV_DefineSpace without authorisation (allowed until the NV is locked)."""
    public = {
        "tag": TAG_NV_DATA_PUBLIC,
        "index": index,
        "read_pcr": _no_pcrs(),
        "write_pcr": _no_pcrs(),
        "permission": {"tag": TAG_NV_ATTRIBUTES, "attributes": attributes},
        "read_st_clear": 0,
        "write_st_clear": 0,
        "write_define": 0,
        "size": size,
    }
    execute(transact, NV_DEFINE_SPACE, {"public": public, "enc_auth": bytes(20)})


def nv_write(transact: Transact, index: int, data: bytes) -> None:
    execute(transact, NV_WRITE_VALUE, {"index": index, "offset": 0, "data": data})


def nv_store(transact: Transact, index: int, data: bytes) -> None:
    """Define an owner-readable, owner-writable index that holds ``data``, and write it."""
    nv_define(transact, index, NV_PER_OWNERREAD | NV_PER_OWNERWRITE, len(data))
    nv_write(transact, index, data)


def nv_lock(transact: Transact) -> None:
    """Set nvLocked: from now on NV access needs the authorisation each index asks for."""
    nv_define(transact, NV_INDEX_LOCK, 0, 0)


def nv_read(transact: Transact, index: int, size: int, owner_auth: bytes | None = None) -> bytes:
    """TPM_NV_ReadValue, with the owner's authorisation when given."""
    values = {"index": index, "offset": 0, "size": size}
    if owner_auth is None:
        return bytes(execute(transact, NV_READ_VALUE, values)["data"])
    return bytes(execute(transact, NV_READ_VALUE_OWNER, values, auth=owner_auth)["data"])


def get_capability(transact: Transact, area: int, sub: bytes = b"") -> bytes:
    return bytes(execute(transact, GET_CAPABILITY, {"area": area, "sub": sub})["answer"])


def nv_indices(transact: Transact) -> list[int]:
    """Every defined NV index (TPM_CAP_NV_LIST)."""
    data = get_capability(transact, CAP_NV_LIST)
    return [int.from_bytes(data[i : i + 4], "big") for i in range(0, len(data), 4)]


def nv_public(transact: Transact, index: int) -> dict[str, Any]:
    """An index's TPM_NV_DATA_PUBLIC (TPM_CAP_NV_INDEX)."""
    return NV_DATA_PUBLIC.parse(get_capability(transact, CAP_NV_INDEX, struct.pack(">I", index)))


def stored_cert(der: bytes) -> bytes:
    """A DER certificate in the TCG header TPM 1.2 NV certificates carry (kept if it has it)."""
    if der[:2] == TAG_PCCLIENT_STORED_CERT.to_bytes(2, "big"):
        return der  # a DER certificate starts with a SEQUENCE (0x30)
    head = STORED_CERT_HEAD.pack(
        TAG_PCCLIENT_STORED_CERT, FULL_CERT, len(der) + 2, TAG_PCCLIENT_FULL_CERT
    )
    return head + der


def unstored_cert(data: bytes) -> bytes:
    """The DER inside a stored certificate (``stored_cert``'s inverse)."""
    if len(data) < STORED_CERT_HEAD.size:
        raise MalformedResponse("too short for a stored certificate")
    tag, kind, size, inner = STORED_CERT_HEAD.unpack_from(data)
    if (tag, kind, inner) != (TAG_PCCLIENT_STORED_CERT, FULL_CERT, TAG_PCCLIENT_FULL_CERT):
        raise MalformedResponse("not a TCG stored full certificate")
    return data[STORED_CERT_HEAD.size : STORED_CERT_HEAD.size + size - 2]
