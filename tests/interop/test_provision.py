"""EK provisioning against a real swtpm, checked with tpm2-tools and swtpm_setup.

Our provisioning talks raw TPM commands to ``swtpm socket``; every check then
reads the TPM back with tpm2-tools (an independent TSS) and compares with a
TPM that swtpm_setup 0.7.1 manufactured with
``--createek --create-ek-cert --create-platform-cert --lock-nvram``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from swtpm_peer import SwtpmPeer, swtpm_socket

from vtpmctl.engine import tpm2 as t
from vtpmctl.engine.provision import (
    EK_ECC_P256,
    EK_ECC_P384,
    EK_RSA2048,
    PLATFORM_CERT_INDEX,
    EkInfo,
    EkSpec,
    ProvisionError,
    provision_ek,
    read_ek_info,
)
from vtpmctl.store.ca import KEY_FILE, LocalCA

pytestmark = pytest.mark.skipif(
    not all(shutil.which(x) for x in ("swtpm", "swtpm_setup", "swtpm_localca", "tpm2_readpublic")),
    reason="needs swtpm, swtpm_setup and tpm2-tools",
)

EK_HANDLES = {EK_RSA2048.handle, EK_ECC_P384.handle}  # swtpm_setup 0.7.1's defaults
CERT_INDEXES = {EK_RSA2048.cert_index, EK_ECC_P384.cert_index, PLATFORM_CERT_INDEX}
LOCKED_CERT_ATTRS = 0x62072801  # as tpm2_nvreadpublic shows a swtpm_setup --lock-nvram index
OID_SDA = x509.ObjectIdentifier("2.5.29.9")


@contextlib.contextmanager
def raw_transact(peer: SwtpmPeer) -> Iterator[t.Transact]:
    """One data-channel connection; closed again so tpm2-tools can connect afterwards."""
    sock = peer.data.connect(timeout=10.0)

    def recv_exact(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise EOFError("swtpm closed the data connection")
            buf += chunk
        return buf

    def transact(cmd: bytes) -> bytes:
        sock.sendall(cmd)
        head = recv_exact(t.HEADER_SIZE)
        return head + recv_exact(int.from_bytes(head[2:6], "big") - t.HEADER_SIZE)

    try:
        yield transact
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


@dataclass
class Ours:
    peer: SwtpmPeer
    info: EkInfo
    ca: LocalCA


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ours]:
    base = tmp_path_factory.mktemp("ours")
    with swtpm_socket(base / "state") as peer:
        ca = LocalCA(base / "ca")
        with raw_transact(peer) as transact:
            info = provision_ek(transact, ca=ca, tpm_info={})
        yield Ours(peer, info, ca)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwtpmPeer]:
    """A TPM made by swtpm_setup, with a private swtpm_localca CA (the system's is untouched)."""
    base = tmp_path_factory.mktemp("swtpm_setup")
    (base / "ca").mkdir()
    (base / "state").mkdir()
    (base / "localca.conf").write_text(
        f"statedir = {base}/ca\n"
        f"signingkey = {base}/ca/signkey.pem\nissuercert = {base}/ca/issuercert.pem\n"
        f"certserial = {base}/ca/certserial\n"
    )
    (base / "localca.options").write_text(
        "--platform-manufacturer vtpmctl\n--platform-model vtpmctl\n--platform-version 0.1.0\n"
    )
    (base / "setup.conf").write_text(
        "create_certs_tool = swtpm_localca\n"
        f"create_certs_tool_config = {base}/localca.conf\n"
        f"create_certs_tool_options = {base}/localca.options\n"
        "active_pcr_banks = sha256\n"
    )
    subprocess.run(
        ["swtpm_setup", "--tpm2", "--tpmstate", str(base / "state"), "--config",
         str(base / "setup.conf"), "--createek", "--create-ek-cert", "--create-platform-cert",
         "--lock-nvram", "--overwrite", "--logfile", str(base / "setup.log")],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    with swtpm_socket(base / "state") as peer:
        yield peer


def handles(peer: SwtpmPeer, kind: str) -> set[int]:
    out = peer.tpm2("getcap", kind).stdout.decode()
    return {int(m, 16) for m in re.findall(r"^- (0x[0-9A-Fa-f]+)$", out, re.M)}


def readpublic_fields(peer: SwtpmPeer, handle: int) -> str:
    """tpm2_readpublic's description of a key with the key material and names cut out."""
    out = peer.tpm2("readpublic", "-c", hex(handle)).stdout.decode()
    skip = ("name:", "qualified name:", "rsa:", "x:", "y:")
    return "\n".join(line for line in out.splitlines() if not line.startswith(skip))


def readpublic_der(peer: SwtpmPeer, handle: int, tmp: Path) -> bytes:
    out = tmp / f"pub-{handle:x}.der"
    peer.tpm2("readpublic", "-c", hex(handle), "-f", "der", "-o", str(out))
    return out.read_bytes()


def nv_cert(peer: SwtpmPeer, index: int, tmp: Path) -> x509.Certificate:
    out = tmp / f"nv-{index:x}.der"
    peer.tpm2("nvread", hex(index), "-C", "o", "-o", str(out))
    return x509.load_der_x509_certificate(out.read_bytes())


def nv_attributes(peer: SwtpmPeer) -> dict[int, tuple[int, int]]:
    """{index: (hash alg, attributes)} from tpm2_nvreadpublic."""
    out = peer.tpm2("nvreadpublic").stdout.decode()
    result: dict[int, tuple[int, int]] = {}
    for block in re.split(r"\n(?=0x)", out.strip()):
        index = int(block.split(":", 1)[0], 16)
        values = re.findall(r"value: (0x[0-9A-Fa-f]+)", block)
        result[index] = (int(values[0], 16), int(values[1], 16))
    return result


def spki(key: object) -> bytes:
    assert isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def extension_shape(cert: x509.Certificate) -> dict[str, bool]:
    return {e.oid.dotted_string: e.critical for e in cert.extensions}


# ----------------------------------------------------------------------------- tests


def test_same_handles_and_indexes_as_swtpm_setup(ours: Ours, reference: SwtpmPeer) -> None:
    assert handles(reference, "handles-persistent") == EK_HANDLES
    assert handles(ours.peer, "handles-persistent") == EK_HANDLES
    assert handles(reference, "handles-nv-index") == CERT_INDEXES
    assert handles(ours.peer, "handles-nv-index") == CERT_INDEXES


@pytest.mark.parametrize("spec", [EK_RSA2048, EK_ECC_P384], ids=["rsa", "ecc"])
def test_ek_key_equals_certificate_key(ours: Ours, tmp_path: Path, spec: EkSpec) -> None:
    key_der = readpublic_der(ours.peer, spec.handle, tmp_path)
    cert = nv_cert(ours.peer, spec.cert_index, tmp_path)
    assert spki(cert.public_key()) == key_der
    ek = ours.info.get(spec.algorithm)
    assert ek is not None and ek.handle == spec.handle
    assert ek.fingerprint_sha256 == hashlib.sha256(key_der).hexdigest()
    assert ek.certificate_pem is not None
    assert x509.load_pem_x509_certificate(ek.certificate_pem.encode()) == cert
    cert.verify_directly_issued_by(ours.ca.certificate)


@pytest.mark.parametrize("spec", [EK_RSA2048, EK_ECC_P384], ids=["rsa", "ecc"])
def test_ek_template_equals_swtpm_setup(ours: Ours, reference: SwtpmPeer, spec: EkSpec) -> None:
    assert readpublic_fields(ours.peer, spec.handle) == readpublic_fields(reference, spec.handle)


def test_same_template_gives_swtpm_setups_key(reference: SwtpmPeer) -> None:
    """On swtpm_setup's TPM our templates re-derive its EKs: they match byte for byte."""
    with raw_transact(reference) as transact:
        for spec in (EK_RSA2048, EK_ECC_P384):
            persisted = t.read_public(transact, spec.handle)
            created = t.create_primary(transact, t.RH_ENDORSEMENT, spec.template)
            t.flush_context(transact, created.handle)
            assert created.public == persisted.public
            assert created.name == persisted.name


def test_nv_attributes_equal_swtpm_setup(ours: Ours, reference: SwtpmPeer) -> None:
    theirs = nv_attributes(reference)
    mine = nv_attributes(ours.peer)
    assert mine == theirs
    assert set(mine.values()) == {(t.Alg.SHA256, LOCKED_CERT_ATTRS)}


@pytest.mark.parametrize("index", sorted(CERT_INDEXES))
def test_cert_indexes_are_write_locked(ours: Ours, tmp_path: Path, index: int) -> None:
    src = tmp_path / "junk"
    src.write_bytes(b"x")
    res = ours.peer.tpm2("nvwrite", "-C", "p", "-i", str(src), hex(index), check=False)
    assert res.returncode != 0
    assert b"0x148" in res.stderr  # TPM_RC_NV_LOCKED


def test_certificate_shape_matches_swtpm_localca(
    ours: Ours, reference: SwtpmPeer, tmp_path: Path
) -> None:
    for index in sorted(CERT_INDEXES):
        mine = nv_cert(ours.peer, index, tmp_path)
        theirs = nv_cert(reference, index, tmp_path)
        assert extension_shape(mine) == extension_shape(theirs), hex(index)
        assert mine.subject == x509.Name([])  # TCG: identity only in the critical SAN
        assert mine.extensions.get_extension_for_class(x509.KeyUsage).value == (
            theirs.extensions.get_extension_for_class(x509.KeyUsage).value
        )
        assert mine.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == (
            theirs.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        )
        if index != PLATFORM_CERT_INDEX:
            # same TPM identity and specification for the same swtpm
            san = x509.SubjectAlternativeName
            assert mine.extensions.get_extension_for_class(san).value == (
                theirs.extensions.get_extension_for_class(san).value
            )
            assert mine.extensions.get_extension_for_oid(OID_SDA).value == (
                theirs.extensions.get_extension_for_oid(OID_SDA).value
            )


def test_platform_cert_is_over_the_rsa_ek(ours: Ours, tmp_path: Path) -> None:
    cert = nv_cert(ours.peer, PLATFORM_CERT_INDEX, tmp_path)
    assert spki(cert.public_key()) == readpublic_der(ours.peer, EK_RSA2048.handle, tmp_path)
    cert.verify_directly_issued_by(ours.ca.certificate)
    assert ours.info.platform_certificate_pem is not None


def test_read_ek_info_on_swtpm_setup_state(ours: Ours, reference: SwtpmPeer) -> None:
    with raw_transact(reference) as transact:
        theirs = read_ek_info(transact)
    with raw_transact(ours.peer) as transact:
        mine = read_ek_info(transact)
    assert mine == ours.info
    assert [k.handle for k in theirs.eks] == [EK_RSA2048.handle, EK_ECC_P384.handle]
    assert theirs.locked and theirs.platform_certificate_pem is not None
    for ek in theirs.eks:
        assert ek.certificate_pem is not None
        cert = x509.load_pem_x509_certificate(ek.certificate_pem.encode())
        assert hashlib.sha256(spki(cert.public_key())).hexdigest() == ek.fingerprint_sha256


def test_p256_unlocked_and_overwrite(tmp_path: Path) -> None:
    ca = LocalCA(tmp_path / "ca")
    with swtpm_socket(tmp_path / "state") as peer:
        with raw_transact(peer) as transact:
            first = provision_ek(
                transact,
                ca=ca,
                rsa=False,
                ecc_curve="p256",
                platform_cert=False,
                lock_nvram=False,
                tpm_info={"model": "vtpmctl-test"},
            )
        assert handles(peer, "handles-persistent") == {EK_ECC_P256.handle}
        assert handles(peer, "handles-nv-index") == {EK_ECC_P256.cert_index}
        assert nv_attributes(peer)[EK_ECC_P256.cert_index] == (t.Alg.SHA256, 0x62072001)
        fields = readpublic_fields(peer, EK_ECC_P256.handle)
        assert "NIST p256" in fields and "raw: 0x300b2" in fields
        assert "837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa" in fields
        cert = nv_cert(peer, EK_ECC_P256.cert_index, tmp_path)
        assert spki(cert.public_key()) == readpublic_der(peer, EK_ECC_P256.handle, tmp_path)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "vtpmctl-test" in repr(san)

        with raw_transact(peer) as transact:
            with pytest.raises(ProvisionError):
                provision_ek(
                    transact, ca=ca, rsa=False, ecc_curve="p256", platform_cert=False, tpm_info={}
                )
            again = provision_ek(
                transact,
                ca=ca,
                rsa=False,
                ecc_curve="p256",
                platform_cert=False,
                tpm_info={},
                overwrite=True,
            )
        # same seed, same template: the same key, now with a locked certificate
        assert again.eks[0].fingerprint_sha256 == first.eks[0].fingerprint_sha256
        assert nv_attributes(peer)[EK_ECC_P256.cert_index] == (t.Alg.SHA256, 0x62072801)


def test_keys_only_without_ca(tmp_path: Path) -> None:
    with swtpm_socket(tmp_path / "state") as peer:
        with raw_transact(peer) as transact:
            info = provision_ek(transact, ca=None, platform_cert=False, tpm_info={})
        assert handles(peer, "handles-persistent") == EK_HANDLES
        assert handles(peer, "handles-nv-index") == set()
        assert all(k.certificate_pem is None for k in info.eks) and not info.locked


def test_local_ca_files(tmp_path: Path) -> None:
    ca = LocalCA(tmp_path / "ca")
    key = tmp_path / "ca" / KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca").stat().st_mode) == 0o700
    assert not [p for p in (tmp_path / "ca").iterdir() if p.name.endswith(".tmp")]
    again = LocalCA(tmp_path / "ca")
    assert again.certificate == ca.certificate
    bc = ca.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca
    # a missing certificate is re-made from the kept key; a missing key is an error
    os.unlink(tmp_path / "ca" / "ca-cert.pem")
    remade = LocalCA(tmp_path / "ca")
    assert spki(remade.certificate.public_key()) == spki(ca.certificate.public_key())
    os.unlink(key)
    with pytest.raises(Exception, match="key"):
        LocalCA(tmp_path / "ca")
