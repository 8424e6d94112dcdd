"""Make real libtpms state blobs for tests, in a throwaway process.

libtpms holds one TPM per process (the unit tests may hold it in the pytest
process), so ``make_state(spec)`` runs this file as a script, which
manufactures a TPM in memory, applies ``spec`` and prints the plaintext blobs
as JSON.

spec keys: ``persistent`` (list of handles to hold an ECC P-256 primary),
``nv`` (list of {"index", "size", "data" hex, "attrs", "auth" hex}),
``fill_nv`` (define 2 KiB indexes until TPM_RC_NV_SPACE), ``volatile`` (bool).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def make_state(spec: dict[str, Any] | None = None, timeout: float = 60) -> dict[str, bytes]:
    proc = subprocess.run(
        [sys.executable, __file__],
        input=json.dumps(spec or {}).encode(),
        capture_output=True,
        timeout=timeout,
        check=True,
        cwd=ROOT,
    )
    return {k: base64.b64decode(v) for k, v in json.loads(proc.stdout).items()}


def _main() -> None:
    sys.path.insert(0, str(ROOT))
    from vtpmctl.engine import tpm2 as t
    from vtpmctl.engine.libtpms import Libtpms, Storage
    from vtpmctl.model import BlobKind, TpmFamily

    spec = json.loads(sys.stdin.read() or "{}")
    files: dict[str, bytes] = {}

    class Mem(Storage):
        def load(self, name: str) -> bytes | None:
            return files.get(name)

        def missing_ok(self, name: str) -> bool:
            return True

        def store(self, name: str, data: bytes) -> None:
            files[name] = data

        def delete(self, name: str, must_exist: bool) -> None:
            files.pop(name, None)

        def locality(self) -> int:
            return 0

    tpm = Libtpms(Mem())
    tpm.choose(TpmFamily.TPM2)
    assert tpm.main_init() == 0
    tr = tpm.process
    t.startup(tr)
    _make_persistent(tr, spec.get("persistent", []))
    _define_nv(tr, spec.get("nv", []))
    if spec.get("fill_nv"):
        _fill_nv(tr)
    out = {"permanent": tpm.get_state(BlobKind.PERMANENT)}
    if spec.get("volatile"):
        out["volatile"] = tpm.get_state(BlobKind.VOLATILE)
    json.dump({k: base64.b64encode(v).decode() for k, v in out.items()}, sys.stdout)


def _make_persistent(tr: Any, handles: list[int]) -> None:
    """An ECC P-256 storage primary at each handle."""
    from vtpmctl.engine import tpm2 as t

    srk = t.Public(
        type=t.Alg.ECC,
        name_alg=t.Alg.SHA256,
        attributes=t.ObjAttr.FIXED_TPM
        | t.ObjAttr.FIXED_PARENT
        | t.ObjAttr.SENSITIVE_DATA_ORIGIN
        | t.ObjAttr.USER_WITH_AUTH
        | t.ObjAttr.RESTRICTED
        | t.ObjAttr.DECRYPT,
        symmetric=t.SymDef(t.Alg.AES, 128, t.Alg.CFB),
        curve=t.Curve.NIST_P256,
    )
    for handle in handles:
        made = t.create_primary(tr, t.RH_OWNER, srk)
        t.evict_control(tr, made.handle, handle)
        t.flush_context(tr, made.handle)


def _retry(fn: Any) -> None:
    """The first DA-protected use after a start may say RETRY."""
    from vtpmctl.engine import tpm2 as t

    for _ in range(3):
        try:
            fn()
            return
        except t.TpmError as exc:
            if exc.base != t.RC.RETRY:
                raise


def _define_nv(tr: Any, specs: list[dict[str, Any]]) -> None:
    from vtpmctl.engine import tpm2 as t

    for nv in specs:
        attrs = nv.get("attrs", _default_nv_attrs())
        auth = bytes.fromhex(nv.get("auth", ""))
        t.nv_define_space(
            tr, t.NvPublic(nv["index"], t.Alg.SHA256, attrs, b"", nv["size"]), index_auth=auth
        )
        if nv.get("data"):
            owner = bool(attrs & t.NvAttr.OWNERWRITE)
            _retry(
                lambda nv=nv, owner=owner, auth=auth: t.nv_write(
                    tr,
                    nv["index"],
                    bytes.fromhex(nv["data"]),
                    auth_handle=t.RH_OWNER if owner else None,
                    auth=b"" if owner else auth,
                )
            )


def _fill_nv(tr: Any) -> None:
    """2 KiB indexes until the TPM has no NV space left."""
    from vtpmctl.engine import tpm2 as t

    index = 0x01600000
    while True:
        try:
            t.nv_define_space(tr, t.NvPublic(index, t.Alg.SHA256, _default_nv_attrs(), b"", 2048))
        except t.TpmError as exc:
            if exc.base == t.RC.NV_SPACE:
                break
            raise
        t.nv_write(tr, index, bytes([index & 0xFF]) * 2048, auth_handle=t.RH_OWNER)
        index += 1


def _default_nv_attrs() -> int:
    from vtpmctl.engine import tpm2 as t

    return t.NvAttr.OWNERWRITE | t.NvAttr.OWNERREAD | t.NvAttr.NO_DA


if __name__ == "__main__":
    _main()
