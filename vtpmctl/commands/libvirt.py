"""`vtpmctl libvirt xml NAME`: the ``<tpm>`` element that puts a libvirt domain on an instance.

libvirt's external TPM backend connects QEMU to a control socket that
something else serves; libvirt starts nothing for it. The element names the
instance's control socket, its TPM version and the device model that fits
it. What libvirt also needs from the instance (a group QEMU's user is in,
``--on-shutdown power-off``) is checked, and a missing piece is named on
stderr with the command that adds it (README.md, "libvirt").
"""

from enum import StrEnum
from typing import TYPE_CHECKING
from xml.sax.saxutils import escape

from vtpmctl.commands.output import note, out
from vtpmctl.errors import InstanceError
from vtpmctl.model import OnShutdown, Transport

if TYPE_CHECKING:
    import typer

    from vtpmctl.store.instances import Instance


class TpmModel(StrEnum):
    """libvirt's TPM device models (``<tpm model=…>``); the first fits a TPM 2.0 on x86."""

    CRB = "tpm-crb"
    TIS = "tpm-tis"
    SPAPR = "tpm-spapr"
    TIS_DEVICE = "tpm-tis-device"


def tpm_element(inst: "Instance", model: TpmModel | None = None) -> str:
    """The ``<tpm>`` element for a socket instance (InstanceError for anything else)."""
    if inst.config.transport != Transport.SOCKET:
        raise InstanceError(
            f"{inst.name} is a {inst.config.transport} instance; libvirt's external TPM "
            "backend needs a socket instance: vtpmctl create NAME --transport socket"
        )
    tpm2 = inst.config.tpm2
    chosen = model or (TpmModel.CRB if tpm2 else TpmModel.TIS)
    if chosen == TpmModel.CRB and not tpm2:
        raise InstanceError(
            f"{inst.name} is a TPM 1.2, which tpm-crb cannot carry; use --model tpm-tis"
        )
    path = escape(str(inst.paths.ctrl_socket), {"'": "&apos;"})
    return (
        f"<tpm model='{chosen}'>\n"
        f"  <backend type='external' version='{inst.config.tpm}'>\n"
        f"    <source type='unix' mode='connect' path='{path}'/>\n"
        "  </backend>\n"
        "</tpm>"
    )


def _missing(inst: "Instance") -> str | None:
    """What keeps a libvirt domain from using the instance as configured, and the fix."""
    name = inst.name
    why, options = [], []
    if inst.config.group is None:
        why.append("only its owner may open the control socket (QEMU runs as libvirt-qemu)")
        options.append("--group libvirt-qemu")
    if inst.config.on_shutdown != OnShutdown.POWER_OFF:
        why.append("it exits at the VM's first shutdown")
        options.append("--on-shutdown power-off")
    if not why:
        return None
    return (
        f"{name} is not set up for libvirt: {'; '.join(why)}; fix: vtpmctl stop {name} && "
        f"vtpmctl start {name} {' '.join(options)}"
    )


def xml(name: str, model: str | None = None) -> int:
    """Print the ``<tpm>`` element for NAME; notes on stderr for what libvirt still needs."""
    from vtpmctl.store.instances import Registry

    inst = Registry().get(name)
    for line in tpm_element(inst, None if model is None else TpmModel(model)).splitlines():
        out(line)
    missing = _missing(inst)
    if missing is not None:
        note(missing)
    return 0


def register(app: "typer.Typer") -> None:
    """Add the libvirt group (xml) to the vtpmctl app."""
    from typing import Annotated

    import typer

    from vtpmctl.commands import args

    group = typer.Typer(
        name="libvirt",
        help="Use instances from libvirt domains.",
        no_args_is_help=True,
    )

    @group.command("xml")
    def xml_cmd(
        name: Annotated[str, args.NAME],
        model: Annotated[
            TpmModel | None,
            typer.Option(
                "--model",
                show_default=False,
                help="device model [default: tpm-crb for TPM 2.0, tpm-tis for 1.2]",
            ),
        ] = None,
    ) -> None:
        """Print the <tpm> element (external backend) to paste into a domain's <devices>."""
        raise typer.Exit(xml(name, None if model is None else model.value))

    app.add_typer(group)
