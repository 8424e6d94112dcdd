"""Make a new TPM in an empty state dir: the one place a TPM may be born.

``vtpmctl create`` execs this as ``python -m vtpmctl _manufacture``
so the CLI never loads libtpms (and never forks a live TPM). It manufactures
(INIT on a dir without permall), starts the TPM, optionally provisions EKs
and certificates, shuts the TPM down so that permall is on disk, and answers
with what it made (``vtpmctl.childproc``: a JSON request in, a JSON answer or
error out). Every later start is ``--existing``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from vtpmctl.device.protocol import TPM12_ST_CLEAR, Cmd, tpm12_startup, tpm_code
from vtpmctl.engine.libtpms import version_text
from vtpmctl.engine.tpm import Engine, EngineConfig
from vtpmctl.engine.tpm2 import SU_CLEAR, build_shutdown, build_startup
from vtpmctl.errors import EngineError
from vtpmctl.model import BlobKind, KeyFormat
from vtpmctl.store.statedir import StateDir, StateDirError

log = logging.getLogger("vtpmctl.manufacture")


class ManufactureError(EngineError):
    """The TPM could not be made; one line, no secrets."""


def _storage_failed(engine: Engine) -> None:
    """A TPM that failed because its state could not be written says so, with the file."""
    if engine.storage_error is not None:
        raise ManufactureError(str(engine.storage_error)) from None


def _provision(engine: Engine, ca_dir: Path, ecc_curve: str) -> dict[str, Any]:
    from vtpmctl.engine.provision import ProvisionError, provision_ek
    from vtpmctl.store.ca import CAError, LocalCA

    try:
        ca = LocalCA(ca_dir)
        info = provision_ek(
            engine.process,
            ca=ca,
            ecc_curve=ecc_curve,  # type: ignore[arg-type]
            platform_cert=True,
            lock_nvram=True,
            tpm_info={},
        )
    except (ProvisionError, CAError) as exc:
        raise ManufactureError(f"EK provisioning failed: {exc}") from None
    return info.as_dict()


def manufacture(
    state_dir: Path,
    *,
    tpm2: bool,
    key_file: Path | None,
    ek: bool,
    ca_dir: Path | None,
    ecc_curve: str = "p384",
    key_fd: int | None = None,
) -> dict[str, Any]:
    """Create the TPM in ``state_dir``; returns what --json prints.

    The state key comes from a hex key file or, in binary, on an inherited
    descriptor (``key_fd``: a pipe, so that no file has to hold it).
    """
    key = None
    if key_file is not None or key_fd is not None:
        from vtpmctl.store.keys import KeyFileError, KeySource, load_key

        try:
            if key_fd is not None:
                key = KeySource(fd=key_fd, kind=KeyFormat.BINARY).resolve()
            elif key_file is not None:
                key = load_key(key_file, kind=KeyFormat.HEX)
        except KeyFileError as exc:
            raise ManufactureError(str(exc)) from None
    statedir = StateDir(state_dir, tpm2=tpm2, key=key)
    statedir.ensure()
    if statedir.exists(BlobKind.PERMANENT.file_name):
        raise ManufactureError(f"{state_dir} already holds a TPM; refusing to replace it")
    engine = Engine(
        statedir,
        EngineConfig(tpm2=tpm2, state_key=key, allow_manufacture=True, disable_auto_shutdown=True),
    )
    result: dict[str, Any] = {
        "libtpms_version": version_text(engine.tpm.version),
        "ek": None,
    }
    try:
        try:
            engine.start()
        except StateDirError as exc:
            raise ManufactureError(str(exc)) from None
        if engine.control(Cmd.INIT, {"init_flags": 0}).result != 0:
            _storage_failed(engine)
            raise ManufactureError("the new TPM failed to initialise; see the log")
        startup = build_startup(SU_CLEAR) if tpm2 else tpm12_startup(TPM12_ST_CLEAR)
        rc = tpm_code(engine.process(startup))
        if rc != 0:
            _storage_failed(engine)
            raise ManufactureError(f"the new TPM refused Startup (rc 0x{rc:x})")
        if ek:
            if ca_dir is None:
                raise ManufactureError("EK certificates need a CA directory")
            result["ek"] = _provision(engine, ca_dir, ecc_curve)
        if tpm2:
            rc = tpm_code(engine.process(build_shutdown(SU_CLEAR)))
            if rc != 0:
                _storage_failed(engine)
                raise ManufactureError(f"the new TPM refused Shutdown (rc 0x{rc:x})")
    finally:
        engine.close()
    if not statedir.exists(BlobKind.PERMANENT.file_name):
        raise ManufactureError(f"libtpms wrote no permanent state into {state_dir}")
    return result


def _handle(request: dict[str, Any]) -> dict[str, Any]:
    """The request ``usecases.create`` sends (paths as strings; no key material)."""

    def path(key: str) -> Path | None:
        value = request.get(key)
        return None if value is None else Path(value)

    log_file = path("log_file")
    if log_file is not None:
        from vtpmctl.store.atomic import open_log

        try:
            fd = open_log(log_file)
        except OSError as exc:
            raise ManufactureError(f"cannot open log file {log_file}: {exc.strerror}") from None
        logging.basicConfig(
            stream=os.fdopen(fd, "a", buffering=1),
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    state_dir = path("state_dir")
    if state_dir is None:
        raise ManufactureError("no state dir in the request")
    return manufacture(
        state_dir,
        tpm2=bool(request.get("tpm2", True)),
        key_file=path("key_file"),
        key_fd=request["key_fd"] if isinstance(request.get("key_fd"), int) else None,
        ek=bool(request.get("ek", False)),
        ca_dir=path("ca_dir"),
        ecc_curve=str(request.get("ecc_curve", "p384")),
    )


def main(argv: list[str] | None = None) -> int:
    """One JSON request on stdin, one JSON answer or error on stdout (no arguments)."""
    from vtpmctl.childproc import serve_child

    return serve_child(_handle)


if __name__ == "__main__":
    sys.exit(main())
