"""`vtpmctl verify NAME`: offline health checks of one instance, one line per finding.

Exits 1 when any finding is an error (warnings alone exit 0); ``--json``
prints every finding with stable keys.
"""

from __future__ import annotations

import json
import sys

from vtpmctl.commands import decl
from vtpmctl.commands.output import safe
from vtpmctl.errors import EXIT_FAILURE, EXIT_OK

# `typing` costs more to import than a control round trip; annotations only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import typer

FORMAT_VERSION = 1


def _validate(blobs: dict[str, bytes], tpm2: bool) -> tuple[dict[str, int], str | None]:
    from vtpmctl.usecases.inspect import inspect_blobs

    res = inspect_blobs(blobs, tpm2=tpm2)
    return res.validate, res.error


def verify(name: str, as_json: bool = False, quiet: bool = False, key: str | None = None) -> int:
    """Check NAME's files, keys, permissions, lock and snapshots; change nothing."""
    from vtpmctl.store.instance_keys import with_state_key
    from vtpmctl.store.instances import Registry
    from vtpmctl.store.verify import verify_instance
    from vtpmctl.usecases import supervisor

    inst = with_state_key(Registry().get(name), key)

    def holder(pid: int) -> tuple[bool, str]:
        return supervisor.is_our_daemon(pid, inst), supervisor.process_name(pid)

    findings = verify_instance(inst, validate=_validate, holder_info=holder)
    errors = sum(f.level == "error" for f in findings)
    warnings = sum(f.level == "warn" for f in findings)
    if as_json:
        sys.stdout.write(
            json.dumps(
                {
                    "format_version": FORMAT_VERSION,
                    "instance": name,
                    "ok": not errors,
                    "errors": errors,
                    "warnings": warnings,
                    "findings": [f.to_json() for f in findings],
                }
            )
            + "\n"
        )
        return EXIT_FAILURE if errors else EXIT_OK
    for f in findings:
        if quiet and f.level == "ok":
            continue
        sys.stdout.write(safe(f.line()) + "\n")
    summary = f"{name}: {errors} error(s), {warnings} warning(s)"
    sys.stderr.write(("vtpmctl: " + summary if errors else summary) + "\n")
    return EXIT_FAILURE if errors else EXIT_OK


COMMANDS = (
    decl.Command(
        "verify",
        "vtpmctl.commands.verify:verify",
        "Check a vTPM's state files, keys, permissions, lock and snapshots (offline).",
        decl.NAME,
        decl.JSON,
        decl.Param("quiet", decl.SWITCH, "--quiet", "-q", help="only problems", default=False),
        decl.STATE_KEY,
    ),
)


def register(app: typer.Typer) -> None:
    """Add `verify` to the vtpmctl app."""
    decl.register(app, COMMANDS)
