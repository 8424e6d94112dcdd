"""``ek.json``: the EKs and certificates create provisioned, kept beside the state.

The file is what ``engine.provision.EkInfo.as_dict`` writes (a unit test keeps
the two in step). It reaches vtpmctl from create and from bundles; a bundle's
copy is read with ``read_ek_file``, which checks every field (types, PEM, hex,
one entry per algorithm and handle, each certificate for its own key), so
that ``ek export`` can trust whatever an import wrote. Whether the file tells
the truth about a TPM is the importer's question: it compares the file with
what the TPM state itself holds.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from vtpmctl.store import records
from vtpmctl.store.records import Fail

_HANDLE = re.compile(r"0x81[0-9a-f]{6}")
_NV_INDEX = re.compile(r"0x01[0-9a-f]{6}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"(?:[0-9a-f]{2}){2,66}")
_ALGORITHM = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")


@dataclass
class EkEntry:
    handle: str
    algorithm: str
    public_key_pem: str
    certificate_pem: str | None
    fingerprint_sha256: str
    cert_nv_index: str | None
    name: str


@dataclass
class EkFile:
    eks: list[EkEntry] = field(default_factory=list)
    platform_certificate_pem: str | None = None
    locked: bool = False


def read_ek_file(data: bytes, fail: Fail) -> EkFile:
    """The checked contents of an ek.json; ``fail("what is wrong")`` for anything else."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):  # nested past the recursion limit: malformed too
        raise fail("it is not valid JSON") from None
    ek = ek_file_from_json(obj, fail)
    for i, entry in enumerate(ek.eks):
        _check_entry(entry, f"eks[{i}]", fail)
    for what in ("algorithm", "handle", "cert_nv_index"):
        values = [getattr(e, what) for e in ek.eks if getattr(e, what) is not None]
        if len(set(values)) != len(values):
            raise fail(f"two EKs have the same {what}")
    if ek.platform_certificate_pem is not None:
        _certificate(ek.platform_certificate_pem, "platform_certificate_pem", fail)
    return ek


def ek_file_from_json(obj: object, fail: Fail) -> EkFile:
    """The fields of a decoded ek.json, every key present and of its type."""
    return records.from_json(EkFile, obj, fail, exact=True)


def _check_entry(entry: EkEntry, where: str, fail: Fail) -> None:
    from cryptography.hazmat.primitives import serialization

    if not _HANDLE.fullmatch(entry.handle):
        raise fail(f"{where}.handle {entry.handle!r} is not a persistent handle (0x81xxxxxx)")
    if not _ALGORITHM.fullmatch(entry.algorithm):
        raise fail(f"{where}.algorithm {entry.algorithm!r} is not an algorithm name")
    if not _SHA256.fullmatch(entry.fingerprint_sha256):
        raise fail(f"{where}.fingerprint_sha256 is not a SHA-256 in hex")
    if not _NAME.fullmatch(entry.name):
        raise fail(f"{where}.name is not a TPM Name in hex")
    try:
        key = serialization.load_pem_public_key(entry.public_key_pem.encode())
    except (ValueError, TypeError, UnicodeError):
        raise fail(f"{where}.public_key_pem is not a readable public key") from None
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if hashlib.sha256(spki).hexdigest() != entry.fingerprint_sha256:
        raise fail(f"{where}.fingerprint_sha256 is not the fingerprint of its public key")
    if (entry.certificate_pem is None) != (entry.cert_nv_index is None):
        raise fail(f"{where} has a certificate without an NV index, or an index without one")
    if entry.cert_nv_index is not None and not _NV_INDEX.fullmatch(entry.cert_nv_index):
        raise fail(f"{where}.cert_nv_index {entry.cert_nv_index!r} is not an NV index")
    if entry.certificate_pem is not None:
        from cryptography.exceptions import UnsupportedAlgorithm

        cert = _certificate(entry.certificate_pem, f"{where}.certificate_pem", fail)
        try:
            cert_spki = cert.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        except (ValueError, UnsupportedAlgorithm):
            cert_spki = b""
        if cert_spki != spki:
            raise fail(f"{where}.certificate_pem certifies another key than the EK's")


def _certificate(pem: str, where: str, fail: Fail) -> Any:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(pem.encode())
    except (ValueError, TypeError, UnicodeError):
        raise fail(f"{where} is not a readable X.509 certificate") from None
