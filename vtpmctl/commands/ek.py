"""`vtpmctl ek export`: an instance's EK public keys and certificates, offline.

What create provisioned is recorded beside the state, so this works whether
or not the instance is running and never touches its TPM. A vTPM that libvirt
or Proxmox runs (vtpmctl.store.attached) has no such record: its EKs are read
from its permanent state, in a child process (usecases.inspect).
"""

import contextlib
import json
import sys
from typing import TYPE_CHECKING, Any

from vtpmctl.commands.output import safe
from vtpmctl.errors import InstanceError

if TYPE_CHECKING:
    import typer

FORMAT_VERSION = 1


class EkExportError(InstanceError):
    """No EK data for the instance."""


def _from_state(name: str, key: str | None) -> dict[str, Any]:
    """An attached vTPM's EKs, read from its permanent state as its TPM holds them."""
    from vtpmctl.store.instances import Registry
    from vtpmctl.usecases.inspect import inspect_blobs
    from vtpmctl.usecases.migrate import read_plain_state

    read = read_plain_state(Registry(), name, allow_running=True, key=key)
    found = inspect_blobs(read.blobs, tpm2=read.instance.config.tpm2, describe=True, ek=True)
    if found.ek is None:
        why = found.error or "it is not a TPM 2.0"
        raise EkExportError(f"cannot read the EKs of {name}: {why}")
    return found.ek


def ek_data(name: str, key: str | None = None) -> dict[str, Any]:
    from vtpmctl.store.instances import Registry, read_json

    inst = Registry().get(name)
    try:
        info = _from_state(name, key) if inst.paths.attached else read_json(inst.paths.ek_file)
    except FileNotFoundError:
        raise EkExportError(
            f"{name} has no EK (it was created with --no-ek or as a TPM 1.2)"
        ) from None
    ca_pem = None
    with contextlib.suppress(OSError):
        if not inst.paths.attached:  # vtpmctl's CA signed only what vtpmctl created
            ca_pem = (inst.paths.ca_dir / "ca-cert.pem").read_text()
    return {
        "format_version": FORMAT_VERSION,
        "name": name,
        "eks": info.get("eks", []),
        "platform_certificate_pem": info.get("platform_certificate_pem"),
        "locked": info.get("locked"),
        "ca_certificate_pem": ca_pem,
    }


def export(name: str, as_json: bool = False, pem: bool = False, key: str | None = None) -> int:
    """Print NAME's EKs: a table, --json, or --pem (keys then certificates)."""
    data = ek_data(name, key)
    if as_json:
        sys.stdout.write(json.dumps(data) + "\n")
        return 0
    if pem:
        for ek in data["eks"]:
            sys.stdout.write(ek["public_key_pem"])
            if ek.get("certificate_pem"):
                sys.stdout.write(ek["certificate_pem"])
        if data["platform_certificate_pem"]:
            sys.stdout.write(data["platform_certificate_pem"])
        return 0
    _print_human(data)
    return 0


def _print_human(data: dict[str, Any]) -> None:
    from cryptography import x509

    lines = []
    for ek in data["eks"]:
        lines.append(f"{ek['algorithm']}  handle {ek['handle']}")
        lines.append(f"  public key sha256  {ek['fingerprint_sha256']}")
        if ek.get("certificate_pem"):
            cert = x509.load_pem_x509_certificate(ek["certificate_pem"].encode())
            lines.append(
                f"  certificate        NV {ek['cert_nv_index']}, issuer "
                f"{cert.issuer.rfc4514_string()}, valid until "
                f"{cert.not_valid_after_utc:%Y-%m-%d}"
            )
    if data["platform_certificate_pem"]:
        lines.append("platform certificate  present")
    lines.append(f"NV locked  {'yes' if data['locked'] else 'no'}")
    sys.stdout.write("".join(safe(line) + "\n" for line in lines))


def register(app: "typer.Typer") -> None:
    """Add the `ek` group to the vtpmctl app."""
    from typing import Annotated

    import typer

    from vtpmctl.commands import args

    group = typer.Typer(
        name="ek", no_args_is_help=True, help="Endorsement keys and their certificates."
    )

    @group.command("export")
    def export_cmd(
        name: Annotated[str, args.NAME],
        as_json: Annotated[bool, args.JSON] = False,
        pem: Annotated[
            bool,
            typer.Option(
                "--pem",
                help="PEM: each EK public key and certificate, then the platform certificate",
            ),
        ] = False,
        key: Annotated[str | None, args.STATE_KEY] = None,
    ) -> None:
        """Print an instance's EK public keys and certificates (no need to start it)."""
        if as_json and pem:
            raise typer.BadParameter("give --json or --pem, not both")
        raise typer.Exit(export(name, as_json=as_json, pem=pem, key=key))

    app.add_typer(group)
