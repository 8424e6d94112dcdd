"""`vtpmctl ctl TARGET ACTION`: one control command, the way swtpm_ioctl sends it.

Success is silent (exit 0), as with swtpm_ioctl; failures raise ControlError
or TargetError and the command line prints them as one line.
"""

from vtpmctl.device.client.control import DEFAULT_TIMEOUT
from vtpmctl.device.client.target import open_client
from vtpmctl.device.protocol import InitFlag

# `typing` costs more to import than a control round trip; annotations only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import typer

# action → (takes a value, default value, largest value)
ACTIONS: dict[str, tuple[bool, int | None, int]] = {
    "init": (False, None, 0),
    "stop": (False, None, 0),
    "shutdown": (False, None, 0),
    "locality": (True, None, 0xFF),
    # libtpms lets only localities 3 and 4 reset the established bit.
    "reset-established": (True, 3, 0xFF),
    "cancel": (False, None, 0),
    "store-volatile": (False, None, 0),
    # QEMU asks for 300 retries (3 s) when it takes the lock back.
    "lock-storage": (True, 300, 0xFFFFFFFF),
}


def ctl(
    target: str,
    action: str,
    value: int | None = None,
    delete_volatile: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> int:
    """Send the control command for ACTION to TARGET."""
    if action not in ACTIONS:
        raise ValueError(f"unknown ctl action {action!r}")
    takes_value, default, _ = ACTIONS[action]
    if value is None:
        value = default
    if takes_value and value is None:
        raise ValueError(f"ctl {action} needs a value")
    with open_client(target, timeout=timeout) as client:
        if action == "init":
            client.init(InitFlag.DELETE_VOLATILE if delete_volatile else 0)
        elif action == "stop":
            client.stop()
        elif action == "shutdown":
            client.shutdown()
        elif action == "locality":
            assert value is not None
            client.set_locality(value)
        elif action == "reset-established":
            assert value is not None
            client.reset_established(value)
        elif action == "cancel":
            client.cancel()
        elif action == "store-volatile":
            client.store_volatile()
        elif action == "lock-storage":
            assert value is not None
            client.lock_storage(value)
    return 0


def register(app: "typer.Typer") -> None:
    """Add the `ctl` group to the vtpmctl app."""
    from typing import Annotated

    import typer

    group = typer.Typer(
        name="ctl",
        no_args_is_help=True,
        help="Send one control command to a TPM (like swtpm_ioctl).",
    )

    @group.callback()
    def ctl_target(
        target: Annotated[
            str,
            typer.Argument(
                metavar="TARGET",
                show_default=False,
                help="/dev/vtpm-NAME, unix:PATH, tcp:HOST:PORT or an instance name",
            ),
        ],
    ) -> None:
        """Send one control command to a TPM (like swtpm_ioctl)."""

    def run(
        ctx: typer.Context, action: str, value: int | None = None, delete_volatile: bool = False
    ) -> None:
        assert ctx.parent is not None
        ctl(
            ctx.parent.params["target"],
            action,
            value,
            delete_volatile=delete_volatile,
            timeout=ctx.find_root().params["timeout"],
        )

    @group.command("init")
    def init_cmd(
        ctx: typer.Context,
        delete_volatile: Annotated[
            bool,
            typer.Option("--delete-volatile", help="delete the volatile state once it is loaded"),
        ] = False,
    ) -> None:
        """(Re)initialise the TPM from its stored state (CMD_INIT)."""
        run(ctx, "init", delete_volatile=delete_volatile)

    @group.command("stop")
    def stop_cmd(ctx: typer.Context) -> None:
        """Stop the TPM without ending its process (CMD_STOP)."""
        run(ctx, "stop")

    @group.command("shutdown")
    def shutdown_cmd(ctx: typer.Context) -> None:
        """Stop the TPM and end its process (CMD_SHUTDOWN)."""
        run(ctx, "shutdown")

    @group.command("locality")
    def locality_cmd(
        ctx: typer.Context,
        n: Annotated[
            int,
            typer.Argument(
                metavar="N",
                min=0,
                max=255,
                show_default=False,
                help="locality for the following TPM commands (TPMs accept 0-4)",
            ),
        ],
    ) -> None:
        """Set the locality of the following TPM commands (CMD_SET_LOCALITY)."""
        run(ctx, "locality", n)

    @group.command("reset-established")
    def reset_cmd(
        ctx: typer.Context,
        loc: Annotated[
            int | None,
            typer.Argument(
                metavar="[LOC]",
                min=0,
                max=255,
                show_default=False,
                help="locality to reset from (default 3; TPMs accept 3 or 4)",
            ),
        ] = None,
    ) -> None:
        """Reset the TPM-established bit (CMD_RESET_TPMESTABLISHED)."""
        run(ctx, "reset-established", loc)

    @group.command("cancel")
    def cancel_cmd(ctx: typer.Context) -> None:
        """Cancel a long-running TPM command (CMD_CANCEL_TPM_CMD)."""
        run(ctx, "cancel")

    @group.command("store-volatile")
    def store_cmd(ctx: typer.Context) -> None:
        """Write the volatile state to storage; the next init resumes it."""
        run(ctx, "store-volatile")

    @group.command("lock-storage")
    def lock_cmd(
        ctx: typer.Context,
        n: Annotated[
            int | None,
            typer.Argument(
                metavar="[N]",
                min=0,
                max=0xFFFFFFFF,
                show_default=False,
                help="retries, 10 ms apart (default 300)",
            ),
        ] = None,
    ) -> None:
        """Take the storage lock back, e.g. after an outgoing migration failed."""
        run(ctx, "lock-storage", n)

    app.add_typer(group)
