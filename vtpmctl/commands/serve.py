"""`vtpmctl serve`: one vTPM in the foreground, options as `swtpm socket` users know them."""

from pathlib import Path
from typing import TYPE_CHECKING

from vtpmctl.commands.choices import KeyFormat, TpmFamily

if TYPE_CHECKING:
    import typer


def serve(
    state: Path,
    ctrl: str | None,
    data: str | None,
    cuse: str | None,
    tpm: str,
    flags: list[str],
    key_file: Path | None,
    key_kind: str,
    migration_key_file: Path | None,
    pid_file: Path | None,
    log_file: Path | None,
    terminate: bool,
    incoming: bool,
    existing: bool,
) -> int:
    """Run the daemon in this process until CMD_SHUTDOWN or SIGTERM."""
    from vtpmctl.device.server.daemon import DaemonOptions, run

    return run(
        DaemonOptions(
            state_dir=state,
            ctrl=ctrl,
            data=data,
            cuse=cuse,
            tpm2=tpm == "2",
            flags=flags,
            key_file=key_file,
            key_kind=key_kind,
            migration_key_file=migration_key_file,
            pid_file=pid_file,
            log_file=log_file,
            terminate=terminate,
            incoming=incoming,
            allow_manufacture=False if existing else None,
        )
    )


def register(app: "typer.Typer") -> None:
    """Add `serve` to the vtpmctl app."""
    from typing import Annotated

    import typer

    @app.command("serve")
    def serve_cmd(
        state: Annotated[
            Path,
            typer.Option(
                "--state", help="state directory (swtpm's --tpmstate dir=)", show_default=False
            ),
        ],
        ctrl: Annotated[
            str | None,
            typer.Option("--ctrl", metavar="unix:PATH|tcp:HOST:PORT", help="control channel"),
        ] = None,
        data: Annotated[
            str | None,
            typer.Option(
                "--data",
                metavar="unix:PATH|tcp:HOST:PORT",
                help="data channel (QEMU passes its own with CMD_SET_DATAFD)",
            ),
        ] = None,
        cuse: Annotated[
            str | None,
            typer.Option("--cuse", metavar="NAME", help="serve /dev/vtpm-NAME instead of sockets"),
        ] = None,
        tpm: Annotated[TpmFamily, typer.Option("--tpm", help="TPM family")] = TpmFamily.TPM2,
        flags: Annotated[
            list[str] | None,
            typer.Option(
                "--flags",
                metavar="FLAG[,FLAG]",
                help="not-need-init, startup-clear, startup-state, disable-auto-shutdown",
            ),
        ] = None,
        key_file: Annotated[
            Path | None,
            typer.Option("--key-file", help="state key file (0600): hex or binary AES key"),
        ] = None,
        key_kind: Annotated[
            KeyFormat, typer.Option("--key-format", help="how to read --key-file")
        ] = KeyFormat.AUTO,
        migration_key_file: Annotated[
            Path | None,
            typer.Option("--migration-key-file", help="key that encrypts exported state blobs"),
        ] = None,
        pid_file: Annotated[Path | None, typer.Option("--pid-file")] = None,
        log_file: Annotated[
            Path | None, typer.Option("--log-file", help="log here instead of stderr")
        ] = None,
        terminate: Annotated[
            bool, typer.Option("--terminate", help="exit when the data connection is lost")
        ] = False,
        incoming: Annotated[
            bool, typer.Option("--incoming", help="wait for QEMU's state (incoming migration)")
        ] = False,
        existing: Annotated[
            bool, typer.Option("--existing", help="refuse to create a TPM if the state is missing")
        ] = False,
    ) -> None:
        """Serve one vTPM in the foreground (like `swtpm socket` / `swtpm cuse`)."""
        if (ctrl is None) == (cuse is None):
            raise typer.BadParameter("give exactly one of --ctrl or --cuse")
        code = serve(
            state,
            ctrl,
            data,
            cuse,
            tpm.value,
            flags or [],
            key_file,
            key_kind.value,
            migration_key_file,
            pid_file,
            log_file,
            terminate,
            incoming,
            existing,
        )
        raise typer.Exit(code)
