"""Offline examination of libtpms state blobs, in a process of its own.

libtpms keeps one TPM in process globals and ``TPMLIB_ValidateState``
overwrites them, so blobs are never examined in the caller's process:
``vtpmctl.usecases.inspect.inspect_blobs`` runs ``python -m vtpmctl
_inspect``, which is this module: it takes the plaintext blobs in a JSON
request and answers with an ``InspectResult`` as JSON (``vtpmctl.childproc``).
It serves the blobs to libtpms from memory and writes nothing to disk; it never
manufactures (a missing permanent state is an error, not a new TPM).

What it reports:

* ``validate``: ``TPMLIB_ValidateState`` per blob kind, before MainInit (the
  only time it is safe). 0 is good; a volatile blob is checked against the
  permanent one it is given with (a volatile state of another TPM fails).
* with ``describe``: the TPM is powered on from the blobs (TPM 2.0 only is
  decoded), started unless the volatile state resumed it, and its persistent
  handles (with their Names) and NV indexes (attributes, size and a sha256 of
  the contents where the index can be read with an empty password) listed.
* with ``ek`` too: its EKs and certificates, as ``ek.json`` describes them
  (an import compares a bundle's ek.json with this).
"""

from __future__ import annotations

import base64
import sys
from typing import TYPE_CHECKING, Any

from vtpmctl.model import BlobKind, TpmFamily

if TYPE_CHECKING:
    from vtpmctl.engine.tpm2 import Transact


# ---------------------------------------------------------------- child side


class _InspectError(Exception):
    """Decoding failed; the message is one line.

    Private control flow, outside the error tree: ``_run`` turns it into the
    result's ``error`` field, so it never reaches the user as an exception.
    """


def _run(request: dict[str, Any]) -> dict[str, Any]:
    """The child's work: load libtpms here (this process is thrown away afterwards)."""
    from vtpmctl.engine.libtpms import Libtpms, Storage, version_text

    tpm2 = bool(request.get("tpm2", True))
    describe = bool(request.get("describe", False))
    raw = request.get("blobs") or {}
    blobs = {kind: base64.b64decode(raw[kind]) for kind in BlobKind if raw.get(kind)}
    files = {k.file_name: v for k, v in blobs.items()}

    class MemoryStorage(Storage):
        """The blobs, served from memory; nothing is written anywhere."""

        def load(self, name: str) -> bytes | None:
            return files.get(name)

        def missing_ok(self, name: str) -> bool:
            # never manufacture a TPM in place of a missing one
            return name != BlobKind.PERMANENT.file_name

        def store(self, name: str, data: bytes) -> None:
            files[name] = data

        def delete(self, name: str, must_exist: bool) -> None:
            files.pop(name, None)

        def locality(self) -> int:
            return 0

    tpm = Libtpms(MemoryStorage())
    tpm.set_debug_fd(sys.stderr.fileno())
    tpm.choose(TpmFamily.of(tpm2))
    # ValidateState only before MainInit: it overwrites libtpms' NV globals.
    validate = {str(kind): tpm.validate_state([kind]) for kind in blobs}
    # The fields of usecases.inspect.InspectResult (but its log, which is stderr).
    result: dict[str, Any] = {
        "ok": bool(validate) and not any(validate.values()),
        "validate": validate,
        "persistent": None,
        "nv": None,
        "ek": None,
        "error": None,
        # the libtpms that judged the blobs: an import records it (no second child)
        "libtpms_version": version_text(tpm.version),
    }
    if not blobs:
        result["error"] = "no state blobs given"
    elif BlobKind.PERMANENT not in blobs:
        result["ok"] = False
        result["error"] = "no permanent state: there is no TPM to inspect"
    if not describe or result["error"] is not None:
        return result
    rc = tpm.main_init()
    try:
        if rc:
            raise _InspectError(
                f"the TPM does not power on from these blobs (TPMLIB_MainInit 0x{rc:x})"
            )
        if tpm2:
            _describe_tpm2(tpm.process, result, resumed=BlobKind.VOLATILE in blobs)
            if request.get("ek"):
                _read_eks(tpm.process, result)
    except _InspectError as exc:
        result["ok"] = False
        result["error"] = str(exc)
    finally:
        tpm.terminate()
        tpm.free_response_buffer()
    return result


def _describe_tpm2(transact: Transact, result: dict[str, Any], *, resumed: bool) -> None:
    from vtpmctl.engine import tpm2 as t

    try:
        t.startup(transact, t.SU_CLEAR)
    except t.TpmError as exc:
        if not (resumed and exc.base == t.RC.INITIALIZE):  # a resumed TPM is started already
            raise _InspectError(f"the TPM does not start from these blobs ({exc})") from None
    try:
        persistent = {}
        for handle in t.get_handles(transact, t.HR_PERSISTENT):
            try:
                name = t.read_public(transact, handle).name.hex()
            except t.TpmError:
                name = ""
            persistent[f"0x{handle:08x}"] = name
        chunk = t.get_property(transact, t.PT.NV_BUFFER_MAX) or 1024
        nv: dict[str, dict[str, object]] = {}
        for index in t.get_handles(transact, t.HR_NV_INDEX):
            pub = t.nv_read_public(transact, index)
            data = _read_nv(transact, pub, chunk)
            nv[f"0x{index:08x}"] = {
                "attributes": pub.attributes,
                "size": pub.data_size,
                "sha256": None if data is None else _sha256(data),
            }
    except (t.TpmError, t.MalformedResponse) as exc:
        raise _InspectError(f"cannot list the TPM's objects ({exc})") from None
    result["persistent"] = persistent
    result["nv"] = nv


def _read_eks(transact: Transact, result: dict[str, Any]) -> None:
    from vtpmctl.engine import tpm2 as t
    from vtpmctl.engine.provision import ProvisionError, read_ek_info

    for attempt in range(3):  # the first DA-protected use after a start may say RETRY
        try:
            result["ek"] = read_ek_info(transact).as_dict()
            return
        except t.TpmError as exc:
            if exc.base != t.RC.RETRY or attempt == 2:
                raise _InspectError(f"cannot read the TPM's EKs ({exc})") from None
        except (t.MalformedResponse, ProvisionError) as exc:
            raise _InspectError(f"cannot read the TPM's EKs ({exc})") from None


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _read_nv(transact: Transact, pub: Any, chunk: int) -> bytes | None:
    """The index's contents, or None when it cannot be read with an empty password.

    The index's own auth first (AUTHREAD), then the owner's (OWNERREAD); a
    policy-only or read-locked index stays unread.
    """
    from vtpmctl.engine import tpm2 as t

    attrs = pub.attributes
    if not attrs & t.NvAttr.WRITTEN or attrs & t.NvAttr.READLOCKED:
        return None
    tries: list[int] = []
    if attrs & t.NvAttr.AUTHREAD:
        tries.append(pub.index)
    if attrs & t.NvAttr.OWNERREAD:
        tries.append(t.RH_OWNER)
    for auth_handle in tries:
        for _ in range(3):  # the first DA-protected use after a start may say RETRY
            try:
                if pub.data_size == 0:
                    t.parse_nv_read(
                        transact(t.build_nv_read(pub.index, 0, auth_handle=auth_handle))
                    )
                    return b""
                return t.nv_read(
                    transact, pub.index, pub.data_size, auth_handle=auth_handle, chunk=chunk
                )
            except t.TpmError as exc:
                if exc.base != t.RC.RETRY:
                    break
    return None


def main(argv: list[str] | None = None) -> int:
    """One JSON request on stdin, one InspectResult as JSON on stdout (no arguments)."""
    from vtpmctl.childproc import serve_child

    return serve_child(_run)


if __name__ == "__main__":
    sys.exit(main())
