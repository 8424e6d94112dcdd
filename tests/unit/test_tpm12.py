"""TPM 1.2 command tables: the bytes they build, the answers they read."""

from __future__ import annotations

import hashlib

import pytest

from vtpmctl.engine import tpm12 as t
from vtpmctl.engine.tpm2 import MalformedResponse, TpmError


def test_requests_have_the_spec_bytes() -> None:
    pp = t.build(t.TSC_PHYSICAL_PRESENCE, {"bits": t.PHYSICAL_PRESENCE_CMD_ENABLE})
    assert pp == bytes.fromhex("00c1 0000000c 4000000a 0020")
    assert t.build(t.PHYSICAL_ENABLE, {}) == bytes.fromhex("00c1 0000000a 0000006f")
    nonce = bytes(range(20))
    ek = t.build(
        t.CREATE_ENDORSEMENT_KEY_PAIR,
        {"anti_replay": nonce, "parms": t._rsa_parms(t.ES_RSAESOAEP_SHA1_MGF1, t.SS_NONE)},
    )
    parms = "00000001 0003 0001 0000000c 00000800 00000002 00000000"
    assert ek == bytes.fromhex("00c1 00000036 00000078") + nonce + bytes.fromhex(parms)


def test_nv_lock_defines_the_all_ones_index() -> None:
    sent: list[bytes] = []

    def transact(command: bytes) -> bytes:
        sent.append(command)
        return bytes.fromhex("00c4 0000000a 00000000")

    t.nv_lock(transact)
    pcr = "0003 000000 1f" + "00" * 20
    public = "0018 ffffffff" + pcr + pcr + "0017 00000000 00 00 00 00000000"
    expected = bytes.fromhex("00c1 00000065 000000cc" + public + "00" * 20)
    assert sent == [expected]


def test_answers_are_checked() -> None:
    with pytest.raises(TpmError):
        t.parse(t.PHYSICAL_ENABLE, bytes.fromhex("00c4 0000000a 00000007"))
    with pytest.raises(MalformedResponse):
        t.parse(t.PHYSICAL_ENABLE, bytes.fromhex("00c4 0000000b 00000000"))
    with pytest.raises(MalformedResponse):  # trailing bytes
        t.parse(t.PHYSICAL_ENABLE, bytes.fromhex("00c4 0000000b 00000000 00"))
    answer = t.parse(t.OIAP, bytes.fromhex("00c4 00000022 00000000 01020304") + bytes(20))
    assert answer == {"handle": 0x01020304, "nonce_even": bytes(20)}


def test_authorised_command_checks_the_tpms_hmac() -> None:
    secret = hashlib.sha1(b"ooo").digest()
    even = bytes([7]) * 20
    seen: dict[str, bytes] = {}

    def transact(command: bytes) -> bytes:
        if command[6:10] == bytes.fromhex("0000000a"):
            return bytes.fromhex("00c4 00000022 00000000 00000001") + even
        seen["odd"] = command[-41:-21]
        params = bytes.fromhex("00000002") + b"hi"
        digest = hashlib.sha1(bytes(4) + command[6:10] + params).digest()
        out_even = bytes([9]) * 20
        mac = t._auth_hmac(secret, digest, out_even, seen["odd"], 0)
        body = params + out_even + b"\0" + mac
        return bytes.fromhex("00c5") + (10 + len(body)).to_bytes(4, "big") + bytes(4) + body

    values = {"index": 1, "offset": 0, "size": 2}
    assert t.execute(transact, t.NV_READ_VALUE_OWNER, values, auth=secret) == {"data": b"hi"}
    with pytest.raises(MalformedResponse):  # another secret: the answer's HMAC is wrong
        t.execute(transact, t.NV_READ_VALUE_OWNER, values, auth=hashlib.sha1(b"x").digest())


def test_stored_certificate_header() -> None:
    der = bytes.fromhex("3003020101")
    stored = t.stored_cert(der)
    assert stored == bytes.fromhex("1001 00 0007 1002") + der
    assert t.stored_cert(stored) == stored
    assert t.unstored_cert(stored) == der
    with pytest.raises(MalformedResponse):
        t.unstored_cert(der + bytes(4))
