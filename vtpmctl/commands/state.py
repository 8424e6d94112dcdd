"""`vtpmctl state export|import`: move one raw state blob in or out of a TPM.

The files are exactly what ``swtpm_ioctl --save``/``--load`` read and write,
so the two tools can be mixed.
"""

import os
import sys
from pathlib import Path

from vtpmctl.commands import decl
from vtpmctl.device.client.control import DEFAULT_TIMEOUT
from vtpmctl.device.client.target import open_client, parse_target
from vtpmctl.device.protocol import BlobType
from vtpmctl.errors import StoreError
from vtpmctl.model import BlobKind

# `typing` costs more to import than a control round trip; annotations only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import typer


class StateFileError(StoreError):
    """The blob file (or stdin/stdout) cannot be used; nothing was sent to the TPM."""


def export(
    target: str,
    output: str,
    blob_type: str = BlobKind.PERMANENT,
    decrypted: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
) -> int:
    """Write one state blob of TARGET to OUTPUT ('-' = stdout)."""
    kind = BlobType.of(BlobKind(blob_type))
    # The permanent state is read through an instance's admin endpoint, which answers
    # while a hypervisor holds the control channel.
    where = parse_target(target, read_only=kind == BlobType.PERMANENT)
    # Check the destination first: reading some blobs has side effects on the
    # TPM (a savestate read releases swtpm's storage lock).
    dest = _destination(output)
    try:
        with open_client(where, timeout=timeout) as client:
            _, blob = client.get_state(kind, decrypted=decrypted)
    except BaseException:
        if isinstance(dest, int):
            os.close(dest)
        raise
    if dest is None:
        sys.stdout.buffer.write(blob)
        sys.stdout.buffer.flush()
    elif isinstance(dest, Path):
        from vtpmctl.store.atomic import NoSpaceError, write_atomic

        try:
            write_atomic(dest, blob, mode=0o600)
        except NoSpaceError:
            raise
        except OSError as exc:
            raise StateFileError(f"cannot write {output}: {exc.strerror or exc}") from exc
    else:
        _write_stream(dest, blob, output)
    return 0


def _destination(output: str) -> Path | int | None:
    """Where the blob goes: None for stdout, a Path for a regular file (written
    atomically, mode 0600), or an open fd for a device or pipe given by name."""
    if output == "-":
        if sys.stdout.isatty():
            raise StateFileError(
                "refusing to write a state blob to a terminal; use -o FILE or redirect stdout"
            )
        return None
    from vtpmctl.store.atomic import open_output

    dest = Path(output).absolute()
    if not dest.parent.is_dir():
        raise StateFileError(f"cannot write {output}: directory {dest.parent} does not exist")
    try:
        fd = open_output(dest)
    except OSError as exc:
        raise StateFileError(f"cannot write {output}: {exc.strerror}") from exc
    if fd is None:
        return dest
    if os.isatty(fd):
        os.close(fd)
        raise StateFileError(f"refusing to write a state blob to the terminal {output}")
    return fd


def _write_stream(fd: int, blob: bytes, output: str) -> None:
    from vtpmctl.store.atomic import write_fd

    try:
        write_fd(fd, blob)
    except OSError as exc:
        raise StateFileError(f"cannot write {output}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def import_(
    target: str, source: str, blob_type: str = BlobKind.PERMANENT, timeout: float = DEFAULT_TIMEOUT
) -> int:
    """Stage one state blob from SOURCE ('-' = stdin) in the stopped TPM TARGET."""
    kind = BlobType.of(BlobKind(blob_type))
    where = parse_target(target, changes=True)
    if source == "-":
        if sys.stdin.isatty():
            raise StateFileError(
                "refusing to read a state blob from a terminal; give a FILE or redirect stdin"
            )
        blob = sys.stdin.buffer.read()
    else:
        try:
            blob = Path(source).read_bytes()
        except OSError as exc:
            raise StateFileError(f"cannot read {source}: {exc.strerror or exc}") from exc
    with open_client(where, timeout=timeout) as client:
        client.set_state(kind, blob)
    return 0


def _blob_type() -> decl.Param:
    return decl.Param(
        "blob_type",
        decl.CHOICE,
        "--type",
        "-t",
        help="which blob",
        choices=BlobKind,
        default=BlobKind.PERMANENT,
        case_sensitive=False,
    )


COMMANDS = (
    decl.Command(
        "state export",
        "vtpmctl.commands.state:export",
        "Write a state blob of a running TPM to a file (CMD_GET_STATEBLOB).",
        decl.TARGET,
        decl.Param(
            "output",
            decl.TEXT,
            "-o",
            "--output",
            help="where to write the blob ('-' for stdout); files are created mode 0600",
            required=True,
            metavar="FILE|-",
            show_default=False,
        ),
        _blob_type(),
        decl.Param(
            "decrypted",
            decl.SWITCH,
            "--decrypted/--encrypted",
            help="remove the state-key encryption (as QEMU and swtpm_ioctl do), or keep it",
            default=True,
        ),
        timeout=True,
    ),
    decl.Command(
        "state import",
        "vtpmctl.commands.state:import_",
        "Load a state blob into a stopped TPM (CMD_SET_STATEBLOB); init makes it live.",
        decl.TARGET,
        decl.Param(
            "source",
            decl.ARG,
            help="the blob ('-' for stdin)",
            required=True,
            metavar="FILE|-",
            show_default=False,
        ),
        _blob_type(),
        timeout=True,
    ),
)


def register(app: "typer.Typer") -> None:
    """Add the `state` group to the vtpmctl app."""
    import typer

    group = typer.Typer(
        name="state",
        no_args_is_help=True,
        help="Export or import one raw state blob (swtpm_ioctl --save/--load).",
    )
    decl.register(group, COMMANDS)
    app.add_typer(group)
