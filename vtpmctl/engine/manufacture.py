"""Make a new TPM in an empty state dir: the one place a TPM may be born.

``vtpmctl create`` execs this as ``python -m vtpmctl _manufacture``
so the CLI never loads libtpms (and never forks a live TPM). It manufactures
(INIT on a dir without permall), starts the TPM, optionally provisions EKs
and certificates, shuts the TPM down so that permall is on disk, and prints
one JSON object with what it made. Every later start is ``--existing``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from vtpmctl.device.protocol import TPM12_ST_CLEAR, Cmd, tpm12_startup, tpm_code
from vtpmctl.engine.tpm import Engine, EngineConfig
from vtpmctl.engine.tpm2 import SU_CLEAR, build_shutdown, build_startup
from vtpmctl.errors import EngineError
from vtpmctl.model import BlobKind, KeyFormat, TpmFamily
from vtpmctl.store.statedir import StateDir, StateDirError

log = logging.getLogger("vtpmctl.manufacture")


class ManufactureError(EngineError):
    """The TPM could not be made; one line, no secrets."""


def libtpms_version_string(version: int) -> str:
    return f"{version >> 16}.{(version >> 8) & 0xFF}.{version & 0xFF}"


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
) -> dict[str, Any]:
    """Create the TPM in ``state_dir``; returns what --json prints."""
    key = None
    if key_file is not None:
        from vtpmctl.store.keys import KeyFileError, load_key

        try:
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
        "libtpms_version": libtpms_version_string(engine.tpm.version),
        "ek": None,
    }
    try:
        try:
            engine.start()
        except StateDirError as exc:
            raise ManufactureError(str(exc)) from None
        if engine.control(Cmd.INIT, {"init_flags": 0}).result != 0:
            raise ManufactureError("the new TPM failed to initialise; see the log")
        startup = build_startup(SU_CLEAR) if tpm2 else tpm12_startup(TPM12_ST_CLEAR)
        rc = tpm_code(engine.process(startup))
        if rc != 0:
            raise ManufactureError(f"the new TPM refused Startup (rc 0x{rc:x})")
        if ek:
            if ca_dir is None:
                raise ManufactureError("EK certificates need a CA directory")
            result["ek"] = _provision(engine, ca_dir, ecc_curve)
        if tpm2:
            rc = tpm_code(engine.process(build_shutdown(SU_CLEAR)))
            if rc != 0:
                raise ManufactureError(f"the new TPM refused Shutdown (rc 0x{rc:x})")
    finally:
        engine.close()
    if not statedir.exists(BlobKind.PERMANENT.file_name):
        raise ManufactureError(f"libtpms wrote no permanent state into {state_dir}")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vtpmctl-manufacture", description=__doc__)
    p.add_argument("--state", type=Path, required=True)
    p.add_argument("--tpm", choices=[str(f) for f in TpmFamily], default=str(TpmFamily.TPM2))
    p.add_argument("--key-file", type=Path)
    p.add_argument("--ek", action="store_true")
    p.add_argument("--ca-dir", type=Path)
    p.add_argument("--ecc-curve", choices=["p256", "p384"], default="p384")
    p.add_argument("--log-file", type=Path)
    ns = p.parse_args(argv)
    if ns.log_file is not None:
        from vtpmctl.store.atomic import open_log

        try:
            fd = open_log(ns.log_file)
        except OSError as exc:
            print(f"vtpmctl: cannot open log file {ns.log_file}: {exc.strerror}", file=sys.stderr)
            return 1
        logging.basicConfig(
            stream=os.fdopen(fd, "a", buffering=1),
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    try:
        result = manufacture(
            ns.state,
            tpm2=TpmFamily(ns.tpm).tpm2,
            key_file=ns.key_file,
            ek=ns.ek,
            ca_dir=ns.ca_dir,
            ecc_curve=ns.ecc_curve,
        )
    except ManufactureError as exc:
        print(f"vtpmctl: {exc}", file=sys.stderr)
        return 1
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
