"""The TPM side of ``swtpm_setup``: two short child runs around the certificate tool.

swtpm_setup's certificates come from an external program (``create_certs_tool``
in swtpm_setup.conf, normally swtpm_localca) that needs the EK's public key.
A process holding a TPM must not fork, so the work is split: ``create``
manufactures the TPM and persists its keys (answering with their public
parts and the TPM's identity), the parent runs the tool, and ``finish``
opens the same state again to write the certificates, lock the NV indexes
and choose the PCR banks. A TPM 1.2 goes the same way: ``create`` enables it,
makes its EK and takes ownership (vtpmctl.engine.tpm12), ``finish`` stores
the certificates and sets the NV lock. Both run as ``python -m vtpmctl _swtpm_setup``
(one JSON request in, one answer out; the state key and the owner and SRK
secrets travel on stdin only).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from vtpmctl.device.protocol import TPM12_ST_CLEAR, Cmd, InfoFlag, tpm12_startup, tpm_code
from vtpmctl.engine.manufacture import ManufactureError
from vtpmctl.engine.tpm import Engine, EngineConfig
from vtpmctl.engine.tpm2 import SU_CLEAR, build_shutdown, build_startup
from vtpmctl.model import BlobKind
from vtpmctl.store.blob import AesKey
from vtpmctl.store.linearfile import LinearFile
from vtpmctl.store.statedir import StateDir, StateDirError

# PCR bank names as swtpm_setup spells them.
BANKS = {"sha1": 0x0004, "sha256": 0x000B, "sha384": 0x000C, "sha512": 0x000D, "sm3-256": 0x0012}


def _open(request: dict[str, Any], *, new: bool) -> tuple[StateDir, Engine]:
    key_hex = request.get("key")
    key = AesKey(bytes.fromhex(key_hex)) if key_hex else None
    tpm2 = bool(request.get("tpm2", True))
    # swtpm's default file mode; a later `swtpm --tpmstate …,mode=` changes it
    path = Path(request["state_dir"])
    statedir: StateDir
    if request.get("backend") == "file":
        statedir = LinearFile(path, tpm2=tpm2, key=key, mode=0o640)
    else:
        statedir = StateDir(path, tpm2=tpm2, key=key, mode=0o640)
    if new:
        statedir.ensure()
    engine = Engine(
        statedir,
        EngineConfig(tpm2=tpm2, state_key=key, allow_manufacture=new, disable_auto_shutdown=True),
    )
    try:
        engine.start()
    except StateDirError as exc:
        engine.close()
        raise ManufactureError(str(exc)) from None
    if engine.control(Cmd.INIT, {"init_flags": 0}).result != 0:
        error = engine.storage_error
        engine.close()
        raise ManufactureError(str(error) if error else "the TPM failed to initialise")
    startup = build_startup(SU_CLEAR) if tpm2 else tpm12_startup(TPM12_ST_CLEAR)
    rc = tpm_code(engine.process(startup))
    if rc != 0:
        engine.close()
        raise ManufactureError(f"the TPM refused Startup (rc 0x{rc:x})")
    return statedir, engine


def _close(engine: Engine, tpm2: bool) -> None:
    try:
        if tpm2:
            rc = tpm_code(engine.process(build_shutdown(SU_CLEAR)))
            if rc != 0:
                raise ManufactureError(f"the TPM refused Shutdown (rc 0x{rc:x})")
    finally:
        engine.close()


def _public(area: Any) -> dict[str, str]:
    from vtpmctl.engine.tpm2 import Alg

    if area.type == Alg.RSA:
        return {"modulus": area.unique.hex()}
    return {"x": area.unique_x.hex(), "y": area.unique_y.hex()}


def create(request: dict[str, Any]) -> dict[str, Any]:
    """Manufacture a TPM, persist its SPK and EKs; their public parts and the TPM's identity."""
    from vtpmctl.engine import provision as p
    from vtpmctl.engine import tpm2 as t

    tpm2 = bool(request.get("tpm2", True))
    statedir, engine = _open(request, new=True)
    answer: dict[str, Any] = {"eks": [], "templates": [], "spk": None, "tpm_info": None}
    try:
        if not tpm2:
            _create12(engine, request, answer)
            return answer
        transact = engine.process
        if request.get("spk"):
            template = p.SPK_TEMPLATE_ECC if request.get("ecc") else p.SPK_TEMPLATE_RSA
            p.create_persistent(transact, t.RH_OWNER, template, p.SPK_HANDLE)
            answer["spk"] = f"0x{p.SPK_HANDLE:08x}"
        if request.get("ek"):
            rsa_spec = p.RSA_SPECS[int(request.get("rsa_keysize", 2048))]
            sign = bool(request.get("allow_signing"))
            decrypt = bool(request.get("decryption")) or not sign
            for spec in (rsa_spec, p.EK_ECC_P384):
                template = p.ek_template(spec, sign=sign, decrypt=decrypt)
                area, _ = p.create_persistent(transact, t.RH_ENDORSEMENT, template, spec.handle)
                record = {
                    "algorithm": spec.algorithm,
                    "handle": spec.handle,
                    "cert_index": spec.cert_index,
                    **_public(area),
                }
                if sign:
                    p.write_nv_blob(transact, spec.template_index, template.template().marshal())
                    answer["templates"].append(spec.template_index)
                    record["template_index"] = spec.template_index
                answer["eks"].append(record)
            answer["tpm_info"] = p.default_tpm_info(transact)
    finally:
        _close(engine, tpm2)
    if not statedir.exists(BlobKind.PERMANENT.file_name):
        raise ManufactureError(f"libtpms wrote no permanent state into {statedir.path}")
    return answer


def finish(request: dict[str, Any]) -> dict[str, Any]:
    """Write certificates, lock NV indexes, choose PCR banks; the banks before and after."""
    from vtpmctl.engine import provision as p
    from vtpmctl.engine import tpm2 as t

    tpm2 = bool(request.get("tpm2", True))
    _, engine = _open(request, new=False)
    answer: dict[str, Any] = {"available": [], "active": []}
    try:
        if not tpm2:
            answer["certs"] = _finish12(engine.process, request)
            return answer
        transact = engine.process
        locked: list[int] = list(request.get("lock", []))
        for index, der_hex in request.get("certs", []):
            p.write_nv_blob(transact, int(index), bytes.fromhex(der_hex))
            locked.append(int(index))
        if request.get("lock_nvram"):
            for index in locked:
                t.nv_write_lock(transact, index, auth_handle=t.RH_PLATFORM)
        names = {alg: name for name, alg in BANKS.items()}
        present = t.get_pcr_banks(transact)
        answer["available"] = [names[a] for a in present if a in names]
        banks = request.get("pcr_banks")
        if banks is None:
            answer["active"] = [names[a] for a, pcrs in present.items() if pcrs and a in names]
        else:
            wanted = {BANKS[b] for b in banks if b in BANKS and BANKS[b] in present}
            if not wanted:
                raise ManufactureError("none of the requested PCR banks is available")
            selection = {alg: (range(24) if alg in wanted else []) for alg in present}
            if not t.pcr_allocate(transact, selection):
                raise ManufactureError("the TPM refused the PCR bank allocation")
            answer["active"] = [names[a] for a in present if a in wanted and a in names]
    finally:
        _close(engine, tpm2)
    return answer


def _tpm12_info(engine: Engine) -> dict[str, str]:
    """The certificate fields swtpm_setup takes from libtpms' own description of a TPM 1.2."""
    info = json.loads(engine.tpm.get_info(InfoFlag.TPMSPECIFICATION | InfoFlag.TPMATTRIBUTES))
    spec, attrs = info["TPMSpecification"], info["TPMAttributes"]
    return {
        "manufacturer": attrs["manufacturer"],
        "model": attrs["model"],
        "version": attrs["version"],
        "spec_family": str(spec["family"]),
        "spec_level": str(spec["level"]),
        "spec_revision": str(spec["revision"]),
    }


def _create12(engine: Engine, request: dict[str, Any], answer: dict[str, Any]) -> None:
    """Enable and activate the TPM 1.2, make its EK and take ownership, as asked.

    The owner and SRK secrets arrive as their 20-byte digests (hex) on stdin.
    """
    from vtpmctl.engine import tpm12

    transact = engine.process
    tpm12.enable(transact)
    if not request.get("ek"):
        return
    modulus = tpm12.create_ek(transact)
    answer["eks"].append(
        {
            "algorithm": "rsa2048",
            "cert_index": tpm12.NV_INDEX_EK_CERT,
            "platform_index": tpm12.NV_INDEX_PLATFORM_CERT,
            "modulus": modulus.hex(),
        }
    )
    owner, srk = request.get("owner_auth"), request.get("srk_auth")
    if owner is not None and srk is not None:
        tpm12.take_ownership(transact, modulus, bytes.fromhex(owner), bytes.fromhex(srk))
        answer["owned"] = True
    answer["tpm_info"] = _tpm12_info(engine)


def _finish12(transact: Any, request: dict[str, Any]) -> list[tuple[int, str]]:
    """Store the certificates (in the TCG header TPM 1.2 NV certificates carry), lock the NV.

    The answer is each certificate as DER (hex) without that header, for the files of
    --write-ek-cert-files: swtpm_localca hands a TPM 1.2's certificates over with it.
    """
    from vtpmctl.engine import tpm12

    stored: list[tuple[int, str]] = []
    for index, der_hex in request.get("certs", []):
        data = tpm12.stored_cert(bytes.fromhex(der_hex))
        tpm12.nv_store(transact, int(index), data)
        stored.append((int(index), tpm12.unstored_cert(data).hex()))
    if request.get("lock_nvram"):
        tpm12.nv_lock(transact)
    return stored


def _handle(request: dict[str, Any]) -> dict[str, Any]:
    phase = request.get("phase")
    if phase == "create":
        return create(request)
    if phase == "finish":
        return finish(request)
    raise ManufactureError(f"unknown phase {phase!r}")


def main(argv: list[str] | None = None) -> int:
    """One JSON request on stdin, one JSON answer or error on stdout (no arguments)."""
    from vtpmctl.childproc import serve_child

    return serve_child(_handle)


if __name__ == "__main__":
    sys.exit(main())
