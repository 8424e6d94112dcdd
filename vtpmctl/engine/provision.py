"""EK manufacturing: what ``swtpm_setup --tpm2 --create-ek-cert …`` leaves in a TPM.

A guest (and whatever attests it) expects a vTPM to come with endorsement
keys at the well-known persistent handles and their certificates in the
well-known NV indexes. vtpmctl writes them with raw TPM 2.0 commands so the
result is indistinguishable from a swtpm_setup-made TPM: same templates (so
the same EK for the same seed), same handles, same NV attributes, same lock.

Facts checked against swtpm_setup 0.7.1 (Debian 12):

* RSA-2048 EK: TCG template L-1 (unique = 256 zero bytes) at 0x81010001,
  certificate at NV 0x01C00002.
* ECC EK: swtpm_setup 0.7.1 makes only NIST P-384, with TCG template H-3
  (nameAlg SHA-384, userWithAuth + adminWithPolicy, PolicyB, AES-256-CFB,
  *empty* unique) at 0x81010016, certificate at 0x01C00016 — with or without
  ``--ecc`` (that flag only changes the storage key). P-256 (template L-2,
  zero-filled unique) is available on request at 0x8101000A / NV 0x01C0000A,
  the places newer swtpm_setup releases use; 0.7.1 cannot make it.
* Certificate indexes: defined by the platform hierarchy with
  PPWRITE|WRITEDEFINE|PPREAD|OWNERREAD|AUTHREAD|NO_DA|PLATFORMCREATE, sized
  to the certificate, empty auth and policy; ``--lock-nvram`` adds
  TPM2_NV_WriteLock (so they read back as WRITELOCKED|WRITTEN).
* Platform certificate at 0x01C08000, issued over the RSA EK.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import rsa as crypto_rsa

from vtpmctl import __version__
from vtpmctl.engine import tpm2 as t
from vtpmctl.engine.tpm2 import Alg, NvAttr, ObjAttr, Public, Scheme, SymDef, Transact
from vtpmctl.errors import EngineError

EkPublicKey = crypto_rsa.RSAPublicKey | ec.EllipticCurvePublicKey


class CertIssuer(Protocol):
    """What provisioning needs from a CA (vtpmctl.store.ca.LocalCA is one).

    A protocol rather than an import keeps the engine independent of the store.
    """

    def issue_ek_cert(self, public_key: EkPublicKey, tpm_info: Mapping[str, str]) -> bytes: ...

    def issue_platform_cert(
        self, public_key: EkPublicKey, tpm_info: Mapping[str, str]
    ) -> bytes: ...


# TCG EK Credential Profile policies: PolicySecret(TPM_RH_ENDORSEMENT).
POLICY_A_SHA256 = bytes.fromhex("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa")
POLICY_B_SHA384 = bytes.fromhex(
    "b26e7d28d11a50bc53d882bcf5fd3a1a074148bb35d3b4e4"
    "cb1c0ad9bde419cacb47ba09699646150f9fc000f3f80e12"
)

_EK_ATTRS = (
    ObjAttr.FIXED_TPM
    | ObjAttr.FIXED_PARENT
    | ObjAttr.SENSITIVE_DATA_ORIGIN
    | ObjAttr.ADMIN_WITH_POLICY
    | ObjAttr.RESTRICTED
    | ObjAttr.DECRYPT
)

EK_TEMPLATE_RSA2048 = Public(  # TCG template L-1
    type=Alg.RSA,
    name_alg=Alg.SHA256,
    attributes=_EK_ATTRS,
    auth_policy=POLICY_A_SHA256,
    symmetric=SymDef(Alg.AES, 128, Alg.CFB),
    scheme=Scheme(Alg.NULL),
    key_bits=2048,
    exponent=0,
    unique=bytes(256),
)

EK_TEMPLATE_ECC_P256 = Public(  # TCG template L-2
    type=Alg.ECC,
    name_alg=Alg.SHA256,
    attributes=_EK_ATTRS,
    auth_policy=POLICY_A_SHA256,
    symmetric=SymDef(Alg.AES, 128, Alg.CFB),
    scheme=Scheme(Alg.NULL),
    curve=t.Curve.NIST_P256,
    kdf=Scheme(Alg.NULL),
    unique_x=bytes(32),
    unique_y=bytes(32),
)

EK_TEMPLATE_ECC_P384 = Public(  # TCG template H-3, as swtpm_setup 0.7.1 uses it
    type=Alg.ECC,
    name_alg=Alg.SHA384,
    attributes=_EK_ATTRS | ObjAttr.USER_WITH_AUTH,
    auth_policy=POLICY_B_SHA384,
    symmetric=SymDef(Alg.AES, 256, Alg.CFB),
    scheme=Scheme(Alg.NULL),
    curve=t.Curve.NIST_P384,
    kdf=Scheme(Alg.NULL),
)


EK_TEMPLATE_RSA3072 = Public(  # TCG template H-2, as swtpm_setup 0.7.1 uses it
    type=Alg.RSA,
    name_alg=Alg.SHA384,
    attributes=_EK_ATTRS | ObjAttr.USER_WITH_AUTH,
    auth_policy=POLICY_B_SHA384,
    symmetric=SymDef(Alg.AES, 256, Alg.CFB),
    scheme=Scheme(Alg.NULL),
    key_bits=3072,
    exponent=0,
)


@dataclass(frozen=True)
class EkSpec:
    """Where one kind of EK, its certificate and (for a non-standard EK) its template live."""

    algorithm: str
    template: Public
    handle: int
    cert_index: int
    template_index: int


EK_RSA2048 = EkSpec("rsa2048", EK_TEMPLATE_RSA2048, 0x81010001, 0x01C00002, 0x01C00004)
EK_RSA3072 = EkSpec("rsa3072", EK_TEMPLATE_RSA3072, 0x8101001C, 0x01C0001C, 0x01C0001D)
EK_ECC_P256 = EkSpec("ecc-nist-p256", EK_TEMPLATE_ECC_P256, 0x8101000A, 0x01C0000A, 0x01C0000B)
EK_ECC_P384 = EkSpec("ecc-nist-p384", EK_TEMPLATE_ECC_P384, 0x81010016, 0x01C00016, 0x01C00017)
EK_SPECS: tuple[EkSpec, ...] = (EK_RSA2048, EK_RSA3072, EK_ECC_P256, EK_ECC_P384)
RSA_SPECS: dict[int, EkSpec] = {2048: EK_RSA2048, 3072: EK_RSA3072}


def ek_template(spec: EkSpec, *, sign: bool, decrypt: bool) -> Public:
    """The EK template with swtpm_setup's ``--allow-signing``/``--decryption`` applied.

    A decryption-only EK is the TCG one (restricted, with its symmetric key); an EK
    that may sign is unrestricted, has no symmetric key and its template is written
    into NV next to its certificate, since tools cannot derive it.
    """
    if not sign:
        return spec.template
    attributes = spec.template.attributes & ~(ObjAttr.RESTRICTED | ObjAttr.DECRYPT)
    attributes |= ObjAttr.SIGN_ENCRYPT | (ObjAttr.DECRYPT if decrypt else 0)
    return replace(spec.template, attributes=attributes, symmetric=SymDef(Alg.NULL))


SPK_HANDLE = 0x81000001
_SPK_ATTRS = (
    ObjAttr.FIXED_TPM
    | ObjAttr.FIXED_PARENT
    | ObjAttr.SENSITIVE_DATA_ORIGIN
    | ObjAttr.USER_WITH_AUTH
    | ObjAttr.NO_DA
    | ObjAttr.RESTRICTED
    | ObjAttr.DECRYPT
)
SPK_TEMPLATE_RSA = Public(  # swtpm_setup 0.7.1 --create-spk
    type=Alg.RSA,
    name_alg=Alg.SHA256,
    attributes=_SPK_ATTRS,
    symmetric=SymDef(Alg.AES, 128, Alg.CFB),
    scheme=Scheme(Alg.NULL),
    key_bits=2048,
    exponent=0,
)
SPK_TEMPLATE_ECC = Public(  # swtpm_setup 0.7.1 --create-spk --ecc
    type=Alg.ECC,
    name_alg=Alg.SHA384,
    attributes=_SPK_ATTRS,
    symmetric=SymDef(Alg.AES, 256, Alg.CFB),
    scheme=Scheme(Alg.NULL),
    curve=t.Curve.NIST_P384,
    kdf=Scheme(Alg.NULL),
)
ECC_SPECS: dict[str, EkSpec] = {"p256": EK_ECC_P256, "p384": EK_ECC_P384}

PLATFORM_CERT_INDEX = 0x01C08000

CERT_NV_ATTRIBUTES = (
    NvAttr.PPWRITE
    | NvAttr.WRITEDEFINE
    | NvAttr.PPREAD
    | NvAttr.OWNERREAD
    | NvAttr.AUTHREAD
    | NvAttr.NO_DA
    | NvAttr.PLATFORMCREATE
)
"""0x42072001: what swtpm_setup defines; reads back 0x62072001, or 0x62072801 once locked."""

TPM_INFO_KEYS = (
    "manufacturer",
    "model",
    "version",
    "spec_family",
    "spec_level",
    "spec_revision",
    "platform_manufacturer",
    "platform_model",
    "platform_version",
)


class ProvisionError(EngineError):
    """The TPM is not in a state that can be provisioned as asked."""


@dataclass(frozen=True)
class EkKey:
    handle: int
    algorithm: str
    public_key_pem: str
    certificate_pem: str | None
    fingerprint_sha256: str
    """Hex SHA-256 of the public key's SubjectPublicKeyInfo DER."""
    cert_index: int | None
    name: bytes
    """TPM Name of the persisted key."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "handle": f"0x{self.handle:08x}",
            "algorithm": self.algorithm,
            "public_key_pem": self.public_key_pem,
            "certificate_pem": self.certificate_pem,
            "fingerprint_sha256": self.fingerprint_sha256,
            "cert_nv_index": None if self.cert_index is None else f"0x{self.cert_index:08x}",
            "name": self.name.hex(),
        }


@dataclass(frozen=True)
class EkInfo:
    eks: tuple[EkKey, ...]
    platform_certificate_pem: str | None = None
    locked: bool = False
    """True when the certificate indexes are write-locked."""

    def get(self, algorithm: str) -> EkKey | None:
        return next((k for k in self.eks if k.algorithm == algorithm), None)

    def as_dict(self) -> dict[str, Any]:
        return {
            "eks": [k.as_dict() for k in self.eks],
            "platform_certificate_pem": self.platform_certificate_pem,
            "locked": self.locked,
        }


_CURVES: dict[int, ec.EllipticCurve] = {
    t.Curve.NIST_P256: ec.SECP256R1(),
    t.Curve.NIST_P384: ec.SECP384R1(),
    t.Curve.NIST_P521: ec.SECP521R1(),
}


def public_key_from_area(area: Public) -> EkPublicKey:
    """The cryptography key inside a TPMT_PUBLIC."""
    if area.type == Alg.RSA:
        modulus = int.from_bytes(area.unique, "big")
        return crypto_rsa.RSAPublicNumbers(area.exponent or 65537, modulus).public_key()
    if area.type == Alg.ECC:
        curve = _CURVES.get(area.curve)
        if curve is None:
            raise ValueError(f"unsupported ECC curve 0x{area.curve:04x}")
        x, y = (int.from_bytes(v, "big") for v in (area.unique_x, area.unique_y))
        return ec.EllipticCurvePublicNumbers(x, y, curve).public_key()
    raise ValueError(f"object type 0x{area.type:04x} has no public key")


def _spki(key: EkPublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _ek_key(spec: EkSpec, key: EkPublicKey, cert_pem: str | None, name: bytes) -> EkKey:
    """What provisioning made and what reading a TPM finds are described alike."""
    return EkKey(
        handle=spec.handle,
        algorithm=spec.algorithm,
        public_key_pem=key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode(),
        certificate_pem=cert_pem,
        fingerprint_sha256=hashlib.sha256(_spki(key)).hexdigest(),
        cert_index=spec.cert_index if cert_pem is not None else None,
        name=name,
    )


def _pem_cert(der: bytes) -> str:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode()


def default_tpm_info(transact: Transact) -> dict[str, str]:
    """The certificate fields swtpm_setup 0.7.1 would use for this TPM.

    swtpm_setup names the manufacturer ``id:00001014`` and the model
    ``swtpm`` whatever the TPM reports; the version is the TPM's
    FIRMWARE_VERSION_1 and the specification comes from LEVEL/REVISION.
    """
    first, last = t.PT.FAMILY_INDICATOR, t.PT.FIRMWARE_VERSION_2
    props = t.get_properties(transact, first, last - first + 1)
    family = props.get(t.PT.FAMILY_INDICATOR, 0x322E3000).to_bytes(4, "big")
    return {
        "manufacturer": "id:00001014",
        "model": "swtpm",
        "version": f"id:{props.get(t.PT.FIRMWARE_VERSION_1, 0):08X}",
        "spec_family": family.rstrip(b"\0").decode("ascii", "replace") or "2.0",
        "spec_level": str(props.get(t.PT.LEVEL, 0)),
        "spec_revision": str(props.get(t.PT.REVISION, 0)),
        "platform_manufacturer": "vtpmctl",
        "platform_model": "vtpmctl",
        "platform_version": __version__,
    }


def _clear_handle(transact: Transact, handle: int, overwrite: bool) -> None:
    if handle not in t.get_handles(transact, handle):
        return
    if not overwrite:
        raise ProvisionError(f"persistent handle 0x{handle:08x} is already in use")
    t.evict_control(transact, handle, handle)


def _clear_index(transact: Transact, index: int, overwrite: bool) -> None:
    if index not in t.get_handles(transact, index):
        return
    if not overwrite:
        raise ProvisionError(f"NV index 0x{index:08x} is already defined")
    t.nv_undefine_space(transact, index, auth_handle=t.RH_PLATFORM)


def _create_ek(
    transact: Transact, spec: EkSpec, template: Public | None = None
) -> tuple[Public, bytes]:
    return create_persistent(transact, t.RH_ENDORSEMENT, template or spec.template, spec.handle)


def create_persistent(
    transact: Transact, hierarchy: int, template: Public, handle: int
) -> tuple[Public, bytes]:
    """A primary key made persistent at ``handle``: its public area and Name."""
    created = t.create_primary(transact, hierarchy, template)
    try:
        t.evict_control(transact, created.handle, handle)
    finally:
        t.flush_context(transact, created.handle)
    return created.area, created.name


def write_nv_blob(transact: Transact, index: int, data: bytes) -> None:
    """Define a platform NV index as swtpm_setup does for certificates and templates."""
    _write_cert(transact, index, data)


def _write_cert(transact: Transact, index: int, der: bytes) -> None:
    public = t.NvPublic(index, Alg.SHA256, CERT_NV_ATTRIBUTES, b"", len(der))
    t.nv_define_space(transact, public, auth_handle=t.RH_PLATFORM)
    t.nv_write(transact, index, der, auth_handle=t.RH_PLATFORM)


def provision_ek(
    transact: Transact,
    *,
    ca: CertIssuer | None,
    rsa: bool = True,
    ecc: bool = True,
    ecc_curve: Literal["p256", "p384"] = "p384",
    platform_cert: bool = True,
    lock_nvram: bool = True,
    tpm_info: Mapping[str, str],
    overwrite: bool = False,
) -> EkInfo:
    """Create and persist EKs, write their certificates, optionally lock them.

    The TPM must be started (TPM2_Startup done) with empty platform, owner
    and endorsement auth, as a freshly manufactured one is. ``ca=None``
    creates the keys only (``swtpm_setup --createek``). Keys of ``tpm_info``
    that are missing are filled from ``default_tpm_info``. Existing EKs or
    certificate indexes are an error unless ``overwrite`` is given.
    """
    if platform_cert and ca is None:
        raise ValueError("a platform certificate needs a CA")
    if ecc_curve not in ECC_SPECS:
        raise ValueError(f"unknown ECC curve {ecc_curve!r}; use one of {sorted(ECC_SPECS)}")
    specs = ([EK_RSA2048] if rsa else []) + ([ECC_SPECS[ecc_curve]] if ecc else [])
    if not specs:
        raise ValueError("nothing to provision: both rsa and ecc are off")

    info = dict(tpm_info)
    if ca is not None and any(k not in info for k in TPM_INFO_KEYS):
        info = {**default_tpm_info(transact), **info}

    for spec in specs:
        _clear_handle(transact, spec.handle, overwrite)
        if ca is not None:
            _clear_index(transact, spec.cert_index, overwrite)
    if platform_cert:
        _clear_index(transact, PLATFORM_CERT_INDEX, overwrite)

    keys: list[EkKey] = []
    locked: list[int] = []
    platform_pem: str | None = None
    for spec in specs:  # RSA first, then its platform certificate, then ECC: swtpm_setup's order
        area, name = _create_ek(transact, spec)
        key = public_key_from_area(area)
        cert_pem: str | None = None
        if ca is not None:
            der = ca.issue_ek_cert(key, info)
            _write_cert(transact, spec.cert_index, der)
            locked.append(spec.cert_index)
            cert_pem = _pem_cert(der)
            if platform_cert and platform_pem is None:
                pder = ca.issue_platform_cert(key, info)
                _write_cert(transact, PLATFORM_CERT_INDEX, pder)
                locked.append(PLATFORM_CERT_INDEX)
                platform_pem = _pem_cert(pder)
        keys.append(_ek_key(spec, key, cert_pem, name))

    if lock_nvram:
        for index in locked:
            t.nv_write_lock(transact, index, auth_handle=t.RH_PLATFORM)
    return EkInfo(tuple(keys), platform_pem, locked=lock_nvram and bool(locked))


def read_ek_info(transact: Transact) -> EkInfo:
    """What a TPM holds at the well-known EK handles and certificate indexes.

    Works on TPMs provisioned by vtpmctl or by swtpm_setup; certificates are
    read with owner authorization (empty).
    """
    persistent = set(t.get_handles(transact, t.HR_PERSISTENT))
    indexes = set(t.get_handles(transact, t.HR_NV_INDEX))

    def cert(index: int) -> tuple[str | None, bool]:
        if index not in indexes:
            return None, False
        pub = t.nv_read_public(transact, index)
        der = t.nv_read(transact, index, pub.data_size, auth_handle=t.RH_OWNER)
        return _pem_cert(der), bool(pub.attributes & NvAttr.WRITELOCKED)

    keys: list[EkKey] = []
    lock_states: list[bool] = []
    for spec in EK_SPECS:
        if spec.handle not in persistent:
            continue
        rp = t.read_public(transact, spec.handle)
        key = public_key_from_area(rp.area)
        cert_pem, is_locked = cert(spec.cert_index)
        if cert_pem is not None:
            lock_states.append(is_locked)
        keys.append(_ek_key(spec, key, cert_pem, rp.name))
    platform_pem, platform_locked = cert(PLATFORM_CERT_INDEX)
    if platform_pem is not None:
        lock_states.append(platform_locked)
    return EkInfo(tuple(keys), platform_pem, locked=bool(lock_states) and all(lock_states))
