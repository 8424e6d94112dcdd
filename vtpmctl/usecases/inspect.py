"""Offline examination of state blobs: the parent side, which never loads libtpms.

``inspect_blobs`` hands plaintext blobs to ``python -m vtpmctl _inspect``
(``vtpmctl.engine.inspect``, a process of its own: libtpms keeps one TPM in
process globals) through ``vtpmctl.childproc`` and returns what it found.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from vtpmctl.model import BlobKind
from vtpmctl.store import records

DEFAULT_TIMEOUT = 30.0


@dataclass
class InspectResult:
    """What the child found; ``ok`` is False when a blob is bad or could not be decoded."""

    ok: bool
    validate: dict[str, int]  # blob kind -> TPMLIB_ValidateState rc (0 good)
    persistent: dict[str, str] | None = None  # "0x81010001" -> Name hex
    nv: dict[str, dict[str, object]] | None = None  # "0x01c00002" -> attributes/size/sha256
    ek: dict[str, Any] | None = None  # the EKs in the state, in ek.json's form
    error: str | None = None
    log: list[str] = field(default_factory=list)  # libtpms' own messages, if any
    libtpms_version: str | None = None  # the child's libtpms, as "0.9.2"

    def to_json(self) -> dict[str, Any]:
        return records.to_json(self)

    @classmethod
    def from_json(cls, data: object) -> InspectResult:
        """The child's answer; ValueError when it is not one."""
        return records.from_json(cls, data, ValueError)


def inspect_blobs(
    blobs: dict[str, bytes],
    *,
    tpm2: bool,
    describe: bool = False,
    ek: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> InspectResult:
    """Validate (and optionally decode) plaintext state blobs in a fresh process.

    ``blobs`` maps "permanent", "volatile" and "savestate" to plaintext libtpms
    state; empty or missing kinds are skipped. Never raises for bad blobs:
    the result says what is wrong.
    """
    from vtpmctl.childproc import ChildError, run_child

    unknown = sorted(set(blobs) - set(BlobKind))
    if unknown:
        raise ValueError(f"unknown blob kinds {unknown}; use {', '.join(BlobKind)}")
    request = {
        "tpm2": tpm2,
        "describe": describe,
        "ek": ek,
        "blobs": {k: base64.b64encode(v).decode() for k, v in blobs.items() if v},
    }
    try:
        reply = run_child("_inspect", request, timeout=timeout)
        result = InspectResult.from_json(reply.answer)
    except ChildError as exc:
        if exc.kind == "TimeoutExpired":
            error = f"the state inspector did not finish within {timeout:g}s"
        elif exc.kind == "OSError" and not exc.log:
            error = f"cannot run the state inspector: {exc}"
        else:
            error = f"the state inspector failed ({exc.kind + ': ' if exc.kind else ''}{exc})"
        return InspectResult(False, {}, error=error, log=exc.log)
    except ValueError:
        return InspectResult(False, {}, error="the state inspector failed (a malformed answer)")
    result.log = reply.log
    return result
