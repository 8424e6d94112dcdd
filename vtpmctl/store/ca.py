"""A local certificate authority for EK and platform certificates.

A virtual TPM has no manufacturer to vouch for its EK, so the host signs the
EK certificate itself, the way swtpm_localca does for swtpm_setup. Verifiers
that trust this CA's certificate can then tell a provisioned vTPM from an
arbitrary software key. The CA lives in a caller-chosen directory; its key is
created once, atomically, and reused so that every vTPM on the host chains to
the same root.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID

from vtpmctl.errors import StoreError
from vtpmctl.store.atomic import write_atomic
from vtpmctl.store.dirs import PRIVATE_MODE, ensure_dir

EkPublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

KEY_FILE = "ca-key.pem"
CERT_FILE = "ca-cert.pem"
LOCK_FILE = ".lock"

# TCG OIDs (TCG EK Credential Profile / Platform Certificate Profile).
OID_TPM_MANUFACTURER = x509.ObjectIdentifier("2.23.133.2.1")
OID_TPM_MODEL = x509.ObjectIdentifier("2.23.133.2.2")
OID_TPM_VERSION = x509.ObjectIdentifier("2.23.133.2.3")
OID_TPM_SPECIFICATION = "2.23.133.2.16"
OID_PLATFORM_MANUFACTURER = x509.ObjectIdentifier("2.23.133.5.1.1")
OID_PLATFORM_MODEL = x509.ObjectIdentifier("2.23.133.5.1.4")
OID_PLATFORM_VERSION = x509.ObjectIdentifier("2.23.133.5.1.5")
OID_KP_EK_CERTIFICATE = x509.ObjectIdentifier("2.23.133.8.1")
OID_KP_PLATFORM_CERTIFICATE = x509.ObjectIdentifier("2.23.133.8.2")
OID_SUBJECT_DIRECTORY_ATTRIBUTES = x509.ObjectIdentifier("2.5.29.9")

# RFC 5280 4.1.2.5: "no well-defined expiration date" for device certificates.
NOT_AFTER = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)


class CAError(StoreError):
    """The CA directory is unusable (half-written, mismatched, unreadable)."""


# ----------------------------------------------------------------- minimal DER
# cryptography has no API for subjectDirectoryAttributes, so that one
# extension value is encoded here (X.690 DER, definite lengths).


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def _der_int(v: int) -> bytes:
    return _der(0x02, v.to_bytes(v.bit_length() // 8 + 1, "big", signed=True))


def _der_oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body += bytes(reversed(chunk))
    return _der(0x06, bytes(body))


def tpm_specification_attributes(family: str, level: int, revision: int) -> bytes:
    """subjectDirectoryAttributes holding one TPMSpecification attribute."""
    spec = _der(0x30, _der(0x0C, family.encode()) + _der_int(level) + _der_int(revision))
    attribute = _der(0x30, _der_oid(OID_TPM_SPECIFICATION) + _der(0x31, spec))
    return _der(0x30, attribute)


# ----------------------------------------------------------------- files


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialise CA creation between processes provisioning at the same time."""
    fd = os.open(
        directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _spki(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _required(info: Mapping[str, str], key: str) -> str:
    try:
        value = info[key]
    except KeyError:
        raise ValueError(f"tpm_info lacks {key!r}") from None
    if not value:
        raise ValueError(f"tpm_info[{key!r}] is empty")
    return value


class LocalCA:
    """Self-signed ECDSA P-256 CA kept as two PEM files in ``directory``.

    The directory is created (0700) if missing. An existing key is always
    reused; a key without a certificate gets a fresh self-signed certificate;
    a certificate without its key is an error, because certificates issued
    under it could no longer be matched by new ones.
    """

    def __init__(
        self, directory: str | os.PathLike[str], *, common_name: str = "vtpmctl local CA"
    ) -> None:
        self.directory = Path(directory)
        ensure_dir(self.directory, PRIVATE_MODE, parent_mode=PRIVATE_MODE)
        key_path = self.directory / KEY_FILE
        cert_path = self.directory / CERT_FILE
        with _locked(self.directory):
            if key_path.exists():
                key = self._load_key(key_path)
            elif cert_path.exists():
                raise CAError(f"{cert_path} exists but its key {key_path} is missing")
            else:
                key = ec.generate_private_key(ec.SECP256R1())
                pem = key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
                write_atomic(key_path, pem, 0o600)
            if cert_path.exists():
                cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
                if _spki(key.public_key()) != _spki(cert.public_key()):
                    raise CAError(f"{cert_path} does not belong to {key_path}")
            else:
                cert = self._self_sign(key, common_name)
                write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        self._key = key
        self.certificate = cert

    @staticmethod
    def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as e:
            raise CAError(f"cannot load CA key {path}: {e}") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CAError(f"CA key {path} is not an ECC key")
        return key

    @staticmethod
    def _self_sign(key: ec.EllipticCurvePrivateKey, common_name: str) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        pub = key.public_key()
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now())
            .not_valid_after(NOT_AFTER)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
            .sign(key, hashes.SHA256())
        )

    @property
    def certificate_pem(self) -> str:
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode()

    def _builder(self, public_key: EkPublicKey, san: x509.Name) -> x509.CertificateBuilder:
        """The part EK and platform certificates share.

        The subject is empty and the identity sits in a critical
        subjectAltName directoryName, as the TCG profiles require.
        """
        if isinstance(public_key, rsa.RSAPublicKey):
            usage = {"key_encipherment": True, "key_agreement": False}
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            usage = {"key_encipherment": False, "key_agreement": True}
        else:
            raise TypeError("EK public key must be RSA or ECC")
        ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now())
            .not_valid_after(NOT_AFTER)
            .add_extension(x509.SubjectAlternativeName([x509.DirectoryName(san)]), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    data_encipherment=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                    **usage,
                ),
                critical=True,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value),
                critical=False,
            )
        )

    def issue_ek_cert(self, public_key: EkPublicKey, tpm_info: Mapping[str, str]) -> bytes:
        """DER EK certificate in the shape of the TCG EK Credential Profile.

        ``tpm_info`` needs ``manufacturer`` (e.g. ``id:00001014``), ``model``
        and ``version`` (e.g. ``id:20191023``); with ``spec_family``,
        ``spec_level`` and ``spec_revision`` the TPM specification attribute is
        added too.
        """
        san = x509.Name(
            [
                x509.RelativeDistinguishedName([x509.NameAttribute(oid, _required(tpm_info, key))])
                for oid, key in (
                    (OID_TPM_MANUFACTURER, "manufacturer"),
                    (OID_TPM_MODEL, "model"),
                    (OID_TPM_VERSION, "version"),
                )
            ]
        )
        builder = self._builder(public_key, san).add_extension(
            x509.ExtendedKeyUsage([OID_KP_EK_CERTIFICATE]), critical=False
        )
        if all(tpm_info.get(k) for k in ("spec_family", "spec_level", "spec_revision")):
            value = tpm_specification_attributes(
                tpm_info["spec_family"],
                int(tpm_info["spec_level"]),
                int(tpm_info["spec_revision"]),
            )
            builder = builder.add_extension(
                x509.UnrecognizedExtension(OID_SUBJECT_DIRECTORY_ATTRIBUTES, value),
                critical=False,
            )
        return builder.sign(self._key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)

    def issue_platform_cert(self, public_key: EkPublicKey, tpm_info: Mapping[str, str]) -> bytes:
        """DER platform certificate for the EK, as swtpm_localca makes it.

        It is an X.509 certificate over the EK (not a TCG attribute
        certificate) naming ``platform_manufacturer``, ``platform_model`` and
        ``platform_version`` from ``tpm_info``.
        """
        san = x509.Name(
            [
                x509.RelativeDistinguishedName([x509.NameAttribute(oid, _required(tpm_info, key))])
                for oid, key in (
                    (OID_PLATFORM_MANUFACTURER, "platform_manufacturer"),
                    (OID_PLATFORM_MODEL, "platform_model"),
                    (OID_PLATFORM_VERSION, "platform_version"),
                )
            ]
        )
        builder = self._builder(public_key, san).add_extension(
            x509.ExtendedKeyUsage([OID_KP_PLATFORM_CERTIFICATE]), critical=False
        )
        return builder.sign(self._key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


__all__ = ["CAError", "EkPublicKey", "LocalCA"]
