"""TPM 2.0 marshaling against bytes written out by hand from the TCG layouts.

The expected byte strings are spelled out literally (not built with the
module's own helpers), and the Name checks use Names that a real TPM
(swtpm 0.7.1 / libtpms) computed for EKs and NV indexes made by swtpm_setup.
"""

from __future__ import annotations

import hashlib
import importlib
import subprocess
import sys
from dataclasses import replace

import pytest

from vtpmctl.engine import tpm2 as t


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


PW_EMPTY = "40000009 0000 01 0000"  # TPM_RS_PW, empty nonce, continueSession, empty auth
POLICY_A = "837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa"
POLICY_B = (
    "b26e7d28d11a50bc53d882bcf5fd3a1a074148bb35d3b4e4"
    "cb1c0ad9bde419cacb47ba09699646150f9fc000f3f80e12"
)

# ---------------------------------------------------------------- command builders


def test_get_random() -> None:
    assert t.build_get_random(16) == h("80 01 00 00 00 0c 00 00 01 7b 00 10")


def test_startup_shutdown() -> None:
    assert t.build_startup(t.SU_CLEAR) == h("8001 0000000c 00000144 0000")
    assert t.build_shutdown(t.SU_STATE) == h("8001 0000000c 00000145 0001")
    # power.py frames them itself, for the engine: the same bytes as the general frame
    for su in (t.SU_CLEAR, t.SU_STATE):
        assert t.build_startup(su) == t.build_command(t.CC.Startup, params=t.u16(su))
        assert t.build_shutdown(su) == t.build_command(t.CC.Shutdown, params=t.u16(su))
    assert t.build_startup() == t.build_startup(t.SU_CLEAR)


def test_get_capability() -> None:
    cmd = t.build_get_capability(t.Cap.HANDLES, t.HR_PERSISTENT, 254)
    assert cmd == h("8001 00000016 0000017a 00000001 81000000 000000fe")
    cmd = t.build_get_capability(t.Cap.TPM_PROPERTIES, t.PT.NV_BUFFER_MAX, 1)
    assert cmd == h("8001 00000016 0000017a 00000006 0000012c 00000001")


def test_handle_only_commands() -> None:
    assert t.build_read_public(0x81010001) == h("8001 0000000e 00000173 81010001")
    assert t.build_nv_read_public(0x01C00002) == h("8001 0000000e 00000169 01c00002")
    # FlushContext carries its handle as a parameter, so no session tag either
    assert t.build_flush_context(0x80000000) == h("8001 0000000e 00000165 80000000")


def test_evict_control() -> None:
    cmd = t.build_evict_control(0x80000000, 0x81010001)
    assert cmd == h(f"8002 00000023 00000120 40000001 80000000 00000009 {PW_EMPTY} 81010001")


def test_nv_define_space() -> None:
    pub = t.NvPublic(0x01C00002, t.Alg.SHA256, 0x42072001, b"", 1016)
    cmd = t.build_nv_define_space(pub, auth_handle=t.RH_PLATFORM)
    assert cmd == h(
        f"8002 0000002d 0000012a 4000000c 00000009 {PW_EMPTY}"
        "0000"  # index auth
        "000e 01c00002 000b 42072001 0000 03f8"
    )


def test_nv_write_with_password() -> None:
    cmd = t.build_nv_write(0x01C00002, b"abc", 0, auth_handle=t.RH_PLATFORM, auth=b"pw")
    assert cmd == h(
        "8002 00000028 00000137 4000000c 01c00002"
        "0000000b 40000009 0000 01 0002 7077"
        "0003 616263 0000"
    )


def test_nv_read_defaults_to_index_auth() -> None:
    assert t.build_nv_read(0x01C00002, 512, 1024) == h(
        f"8002 00000023 0000014e 01c00002 01c00002 00000009 {PW_EMPTY} 0200 0400"
    )
    assert t.build_nv_read(0x01C00002, 512, 1024, auth_handle=t.RH_OWNER)[10:14] == h("40000001")


def test_nv_write_lock_and_undefine() -> None:
    assert t.build_nv_write_lock(0x01C00002, auth_handle=t.RH_PLATFORM) == h(
        f"8002 0000001f 00000138 4000000c 01c00002 00000009 {PW_EMPTY}"
    )
    assert t.build_nv_undefine_space(0x01C00002, auth_handle=t.RH_PLATFORM) == h(
        f"8002 0000001f 00000122 4000000c 01c00002 00000009 {PW_EMPTY}"
    )


def test_pcr_read_and_allocate() -> None:
    assert t.build_pcr_read({t.Alg.SHA256: range(8)}) == h(
        "8001 00000014 0000017e 00000001 000b 03 ff0000"
    )
    assert t.build_pcr_read({t.Alg.SHA1: [0], t.Alg.SHA256: [23]}) == h(
        "8001 0000001a 0000017e 00000002 0004 03 010000 000b 03 000080"
    )
    assert t.build_pcr_allocate({t.Alg.SHA1: [], t.Alg.SHA256: range(24)}) == h(
        f"8002 0000002b 0000012b 4000000c 00000009 {PW_EMPTY}"
        + "00000002 0004 03 000000 000b 03 ffffff"
    )


RSA_EK_TEMPLATE = (
    "0001 000b 000300b2 0020" + POLICY_A + "0006 0080 0043 0010 0800 00000000 0100" + "00" * 256
)
ECC384_EK_TEMPLATE = (
    "0023 000c 000300f2 0030" + POLICY_B + "0006 0100 0043 0010 0004 0010 0000 0000"
)


def test_create_primary() -> None:
    tmpl = t.Public(
        type=t.Alg.RSA,
        name_alg=t.Alg.SHA256,
        attributes=0x000300B2,
        auth_policy=h(POLICY_A),
        symmetric=t.SymDef(t.Alg.AES, 128, t.Alg.CFB),
        scheme=t.Scheme(t.Alg.NULL),
        key_bits=2048,
        unique=bytes(256),
    )
    assert tmpl.marshal() == h(RSA_EK_TEMPLATE)
    cmd = t.build_create_primary(t.RH_ENDORSEMENT, tmpl)
    expected = [
        f"8002 00000163 00000131 4000000b 00000009 {PW_EMPTY}",
        "0004 0000 0000",  # inSensitive: empty userAuth, empty data
        "013a" + RSA_EK_TEMPLATE,  # inPublic
        "0000",  # outsideInfo
        "00000000",  # creationPCR: empty list
    ]
    assert cmd == h("".join(expected))
    # a pre-marshaled TPMT_PUBLIC is sent as is
    assert t.build_create_primary(t.RH_ENDORSEMENT, h(RSA_EK_TEMPLATE)) == cmd


def test_wrong_handle_count_is_refused() -> None:
    with pytest.raises(ValueError):
        t.build_command(t.CC.NV_Write, [0x01C00002], b"", [t.PasswordSession()])
    with pytest.raises(ValueError):
        t.build_command(t.CC.ReadPublic, [0x81010001], b"", [t.PasswordSession()])


# ---------------------------------------------------------------- response parsing


def test_parse_get_random() -> None:
    assert t.parse_get_random(h("8001 00000010 00000000 0004 deadbeef")) == h("deadbeef")


def test_parse_session_response_skips_auth_area() -> None:
    resp = h("8002 00000018 00000000 00000005 0003 616263 0000 01 0000")
    assert t.parse_nv_read(resp) == b"abc"


def test_parse_get_capability_handles() -> None:
    cap = t.parse_get_capability(h("8001 0000001b 00000000 00 00000001 00000002 81010001 81010016"))
    assert cap.handles == (0x81010001, 0x81010016)
    assert not cap.more_data


def test_parse_get_capability_properties() -> None:
    resp = h("8001 00000023 00000000 01 00000006 00000002 0000012c 00000400 0000012d 00000000")
    cap = t.parse_get_capability(resp)
    assert cap.properties == ((0x12C, 0x400), (0x12D, 0))
    assert cap.more_data


def test_parse_nv_read_public_and_name() -> None:
    nv_name = "000b b5d3a23a70e478f7e05c57e9157d9c0391150c5b99795828088f2c552060eb4f"
    nv_public = "000e 01c00002 000b 62072801 0000 03f8"
    resp = h("8001 0000003e 00000000" + nv_public + "0022" + nv_name)
    pub = t.parse_nv_read_public(resp)
    assert (pub.index, pub.name_alg, pub.attributes, pub.data_size) == (
        0x01C00002,
        t.Alg.SHA256,
        0x62072801,
        1016,
    )
    assert pub.attributes & t.NvAttr.WRITELOCKED
    # the TPM's Name of an NV index is nameAlg || H(TPMS_NV_PUBLIC)
    assert pub.name == h(nv_name)
    assert h("000b") + hashlib.sha256(pub.marshal()).digest() == pub.name


def test_parse_create_primary() -> None:
    name = "000b" + "11" * 32
    params = (
        "013a"
        + RSA_EK_TEMPLATE
        + "0000"  # creationData
        + "0000"  # creationHash
        + "8021 4000000b 0000"  # creationTicket
        + "0022"
        + name
    )
    size = 10 + 4 + 4 + len(h(params)) + 5
    resp = h(f"8002 {size:08x} 00000000 80000000 {len(h(params)):08x}" + params + "0000 01 0000")
    res = t.parse_create_primary(resp)
    assert res.handle == 0x80000000
    assert res.public == h(RSA_EK_TEMPLATE)
    assert res.name == h(name)
    assert res.area.key_bits == 2048


# Real EKs created by swtpm_setup 0.7.1 and the Names the TPM reported for them.
RSA_EK_MODULUS = (
    "c0886c4e4e55b0398a29d2c56834b7b20a161409a0ce26d4c6bfadb7b76a5ca438e28681f2ab0c8e7059057efb54"
    "aa6f674cb20e8a9e844800f8511589386a9306ae2c28ee94cb963188521ee9dcd29dc08e651d42cf8bed09007929"
    "daae1be87447e43cfc0a7b5a58378491b532fb1b49be27341529e6d2bf612c405241b87893f828ff5c3db46295ae"
    "00b62d0847e4f63c8549aa7d55f1a670fdd91ea07c55f0953e08f0e176312610a45f001707dc4382ff194df07918"
    "802f8f33b37ce20bca154d0919ef8964de916809f66e100356852cf9a9de345f7eb512d540e60208343509a18815"
    "9fd0432800a598b00d18e1add716dc1abc4c3cb7771eaf201219"
)
RSA_EK_NAME = "000b2db8d26772f91ffe6223c6a7e74e4483687ff01b68716fb1e4933cf7eaaee640"
ECC_EK_X = (
    "864c125de5d78a89e8e99bac8203dc9709a214030c439306"
    "a2831ca0cd0476e65c5ad71f8673345ebdbcfade3d7e3cdf"
)
ECC_EK_Y = (
    "a6431ee99852258bbfa68238e0fa5ddb47f527060f87846d"
    "41477cf1e1d582f368b450496a0b4de1be17d7c4d16784c6"
)
ECC_EK_NAME = (
    "000caa399d36ab1cb81823ff1cf142e3269a7ee2ef7bc23786"
    "5379f5e918fa5c703388d73d5fbb0bd6902066820a56aa5ee1"
)


def test_public_name_matches_tpm_rsa() -> None:
    area = t.Public.parse(h(RSA_EK_TEMPLATE.replace("0100" + "00" * 256, "0100" + RSA_EK_MODULUS)))
    assert area.unique == h(RSA_EK_MODULUS)
    assert area.name() == h(RSA_EK_NAME)
    assert area.template() == replace(area, unique=b"")


def test_public_name_matches_tpm_ecc384() -> None:
    raw = h(ECC384_EK_TEMPLATE[: -len("0000 0000")] + "0030" + ECC_EK_X + "0030" + ECC_EK_Y)
    area = t.Public.parse(raw)
    assert (area.type, area.curve, area.name_alg) == (t.Alg.ECC, t.Curve.NIST_P384, t.Alg.SHA384)
    assert area.symmetric == t.SymDef(t.Alg.AES, 256, t.Alg.CFB)
    assert area.marshal() == raw
    assert area.name() == h(ECC_EK_NAME)


def test_public_roundtrip_other_types() -> None:
    for pub in (
        t.Public(
            t.Alg.KEYEDHASH,
            t.Alg.SHA256,
            0x72,
            scheme=t.Scheme(t.Alg.HMAC, t.Alg.SHA256),
            unique=b"u" * 32,
        ),
        t.Public(
            t.Alg.KEYEDHASH,
            t.Alg.SHA256,
            0x72,
            scheme=t.Scheme(t.Alg.XOR, t.Alg.SHA256),
            kdf=t.Scheme(t.Alg.KDF1_SP800_108),
        ),
        t.Public(
            t.Alg.SYMCIPHER, t.Alg.SHA256, 0x30072, symmetric=t.SymDef(t.Alg.AES, 128, t.Alg.CFB)
        ),
        t.Public(
            t.Alg.ECC,
            t.Alg.SHA256,
            0x40072,
            scheme=t.Scheme(t.Alg.ECDAA, t.Alg.SHA256, 7),
            curve=t.Curve.BN_P256,
        ),
        t.Public(
            t.Alg.RSA,
            t.Alg.SHA256,
            0x60072,
            scheme=t.Scheme(t.Alg.RSAES),
            key_bits=2048,
            exponent=3,
        ),
    ):
        assert t.Public.parse(pub.marshal()) == pub


def test_pcr_selection_roundtrip() -> None:
    sel: dict[int, list[int]] = {t.Alg.SHA1: [], t.Alg.SHA256: [0, 7, 16, 23]}
    raw = t.marshal_pcr_selection(sel)
    assert raw == h("00000002 0004 03 000000 000b 03 810081")
    assert t.read_pcr_selection(t.Reader(raw)) == sel


# ---------------------------------------------------------------- errors


def test_error_response_raises_with_rc() -> None:
    with pytest.raises(t.TpmError) as info:
        t.parse_get_random(h("80 01 00 00 00 0a 00 00 01 01"))
    assert info.value.rc == 0x101
    assert info.value.base == t.RC.FAILURE
    assert "GetRandom" in str(info.value) and "TPM_RC_FAILURE" in str(info.value)


def test_error_response_of_a_session_command() -> None:
    with pytest.raises(t.TpmError) as info:
        t.parse_nv_read(h("8001 0000000a 00000148"))
    assert info.value.base == t.RC.NV_LOCKED


@pytest.mark.parametrize(
    ("rc", "text", "base"),
    [
        (0x000, "TPM_RC_SUCCESS", 0x000),
        (0x100, "TPM_RC_INITIALIZE", 0x100),
        (0x148, "TPM_RC_NV_LOCKED", 0x148),
        (0x14C, "TPM_RC_NV_DEFINED", 0x14C),
        (0x1C4, "TPM_RC_VALUE (parameter 1)", 0x084),
        (0x2C4, "TPM_RC_VALUE (parameter 2)", 0x084),
        (0x18B, "TPM_RC_HANDLE (handle 1)", 0x08B),
        (0x9A2, "TPM_RC_BAD_AUTH (session 1)", 0x0A2),
        (0x98E, "TPM_RC_AUTH_FAIL (session 1)", 0x08E),
        (0x922, "TPM_RC_RETRY", 0x922),
        (0x921, "TPM_RC_LOCKOUT", 0x921),
        (0x910, "TPM_RC_REFERENCE_H0", 0x910),
        (0x009, "TPM 1.2 error 0x9", 0x009),
    ],
)
def test_decode_rc(rc: int, text: str, base: int) -> None:
    assert t.decode_rc(rc) == text
    assert t.rc_base(rc) == base


def test_malformed_responses() -> None:
    with pytest.raises(t.MalformedResponse):  # header size disagrees with length
        t.parse_get_random(h("8001 00000011 00000000 0004 deadbeef"))
    with pytest.raises(t.MalformedResponse):  # TPM2B runs past the end
        t.parse_get_random(h("8001 0000000e 00000000 0004 dead"))
    with pytest.raises(t.MalformedResponse):  # bad tag
        t.parse_get_random(h("1234 0000000c 00000000 0000"))


# ---------------------------------------------------------------- chunking


class Recorder:
    """A transact that answers every NV_Read/NV_Write with success and logs the commands."""

    def __init__(self) -> None:
        self.commands: list[bytes] = []

    def __call__(self, cmd: bytes) -> bytes:
        self.commands.append(cmd)
        if cmd[6:10] == h("0000014e"):
            size = int.from_bytes(cmd[-4:-2], "big")
            params = size.to_bytes(2, "big") + b"\xaa" * size
            body = len(params).to_bytes(4, "big") + params + h("0000 01 0000")
            return h("8002") + (10 + len(body)).to_bytes(4, "big") + h("00000000") + body
        return h("8002 00000013 00000000 00000000 0000 01 0000")


def test_nv_write_is_chunked() -> None:
    rec = Recorder()
    data = bytes(range(256)) * 10  # 2560 bytes
    t.nv_write(rec, 0x01C00002, data, auth_handle=t.RH_PLATFORM, chunk=1024)
    offsets = [int.from_bytes(c[-2:], "big") for c in rec.commands]
    sizes = [int.from_bytes(c[31:33], "big") for c in rec.commands]
    assert offsets == [0, 1024, 2048]
    assert sizes == [1024, 1024, 512]
    assert b"".join(c[33:-2] for c in rec.commands) == data


def test_nv_read_is_chunked() -> None:
    rec = Recorder()
    out = t.nv_read(rec, 0x01C00002, 1500, 100, auth_handle=t.RH_OWNER, chunk=1024)
    assert out == b"\xaa" * 1500
    assert [c[-4:] for c in rec.commands] == [h("0400 0064"), h("01dc 0464")]


# ---------------------------------------------------------------- the package's names


def test_every_name_resolves_from_its_submodule() -> None:
    """The lazy package (PEP 562) offers exactly ``__all__``, each name the object its
    submodule defines (the first of the submodules, lightest first, that has it)."""
    subs = [importlib.import_module(f"vtpmctl.engine.tpm2.{m}") for m in t._SUBMODULES]  # noqa: SLF001
    for name in t.__all__:
        homes = [sub for sub in subs if hasattr(sub, name)]
        assert homes, f"{name} is in no submodule"
        assert all(getattr(home, name) is getattr(t, name) for home in homes), name
    assert set(t.__all__) <= set(dir(t))
    with pytest.raises(AttributeError, match="no attribute 'nosuch'"):
        t.nosuch  # type: ignore[attr-defined]  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'struct'"):
        t.struct  # type: ignore[attr-defined]  # noqa: B018  # a submodule's import, not ours


def test_the_engine_imports_no_command_builders() -> None:
    """Every daemon imports the engine: the builders, their dataclasses and
    hashlib structures stay out of it (it needs only Startup and Shutdown)."""
    code = (
        "import sys\n"
        "import vtpmctl.engine.tpm\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('vtpmctl.engine'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = set(done.stdout.split())
    assert "vtpmctl.engine.tpm2.constants" in loaded
    heavy = {f"vtpmctl.engine.tpm2.{m}" for m in ("commands", "structures", "marshal")}
    assert not loaded & heavy, loaded
