"""`vtpmctl migrate export|import`: move a named vTPM between stores and hosts.

``vtpmctl migrate export a - | ssh host vtpmctl migrate import -`` moves
instance ``a``; the bundle format is described in ``vtpmctl.store.bundle``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from vtpmctl.commands import decl
from vtpmctl.commands.output import print_json, safe
from vtpmctl.errors import UsageError
from vtpmctl.model import KeyFormat, Transport

# `typing` costs more to import than a control round trip; annotations only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    import typer

    from vtpmctl.store.blob import AesKey
    from vtpmctl.store.bundle import Manifest

FORMAT_VERSION = 1


def _key(path: Path | None, kind: str, what: str) -> AesKey | None:
    if path is None:
        return None
    from vtpmctl.store.instance_keys import read_user_key
    from vtpmctl.store.keys import KeyFileError
    from vtpmctl.usecases.migrate import MigrateError

    try:
        return read_user_key(path, kind)
    except KeyFileError as exc:
        raise MigrateError(f"{what}: {exc}") from None


def _manifest_record(m: Manifest) -> dict[str, Any]:
    return m.to_json()


def export(
    name: str,
    output: str,
    migration_key_file: Path | None = None,
    migration_key_format: str = KeyFormat.AUTO,
    allow_running: bool = False,
    as_json: bool = False,
    key: str | None = None,
) -> int:
    """Write a bundle of NAME to OUTPUT ('-' = stdout)."""
    from vtpmctl.store.atomic import NoSpaceError, no_space, open_output, write_atomic, write_fd
    from vtpmctl.store.instances import Registry
    from vtpmctl.usecases.migrate import MigrateError, export_instance

    if output == "-":
        if as_json:
            raise UsageError("--json needs -o FILE: with -o - the bundle itself goes to stdout")
        if sys.stdout.isatty():
            raise MigrateError(
                "refusing to write a bundle to a terminal; use -o FILE or redirect stdout"
            )
    else:
        parent = Path(output).absolute().parent
        if not parent.is_dir():
            raise MigrateError(f"cannot write {output}: directory {parent} does not exist")
    mkey = _key(migration_key_file, migration_key_format, "migration key")
    # A FIFO or device named directly is written into; a link is refused before any work.
    fd: int | None = None
    if output != "-":
        try:
            fd = open_output(Path(output).absolute())
        except OSError as exc:
            raise MigrateError(f"cannot write {output}: {exc.strerror or exc}") from None
        if fd is not None and os.isatty(fd):
            os.close(fd)
            raise MigrateError(f"refusing to write a bundle to the terminal {output}")
    try:
        exported = export_instance(
            Registry(), name, migration_key=mkey, allow_running=allow_running, key=key
        )
        for note in exported.settled:
            sys.stderr.write(f"vtpmctl: {note}\n")
        if output == "-":
            sys.stdout.buffer.write(exported.data)
            sys.stdout.buffer.flush()
            return 0
        try:
            if fd is None:
                write_atomic(Path(output).absolute(), exported.data, 0o600)
            else:
                write_fd(fd, exported.data)
        except OSError as exc:
            full = no_space(exc, output)
            if isinstance(full, NoSpaceError):
                raise full from None
            raise MigrateError(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        if fd is not None:
            os.close(fd)
    m = exported.manifest
    if as_json:
        print_json(
            {
                "format_version": FORMAT_VERSION,
                "name": name,
                "bundle": output,
                "size": len(exported.data),
                "manifest": _manifest_record(m),
            }
        )
        return 0
    blobs = ", ".join(b.type for b in m.blobs)
    enc = (
        f"encrypted with migration key {m.migration_key_fingerprint}"
        if m.migration_key
        else "not encrypted: no migration key"
    )
    sys.stdout.write(f"exported {name} to {output} ({len(exported.data)} bytes; {blobs}; {enc})\n")
    return 0


def import_(
    source: str,
    name: str | None = None,
    migration_key_file: Path | None = None,
    migration_key_format: str = KeyFormat.AUTO,
    encrypt: bool | None = None,
    key_file: Path | None = None,
    key_format: str = KeyFormat.AUTO,
    transport: str | None = None,
    as_json: bool = False,
) -> int:
    """Create an instance from the bundle in SOURCE ('-' = stdin), after checking all of it."""
    from vtpmctl.store.instances import Registry, validate_name
    from vtpmctl.usecases.migrate import ImportOptions, import_bundle, read_bundle_file

    if source.startswith("s3://"):
        given = [migration_key_file, encrypt, key_file, transport]
        if any(v is not None for v in given):
            raise UsageError(
                "an s3:// import takes the instance as pushed (its keys come from the "
                "remote); drop --migration-key-file, --encrypt, --key-file and --transport"
            )
        from vtpmctl.commands.remote import pull_url

        return pull_url(source, name, as_json)
    if encrypt is False and key_file is not None:
        raise UsageError("--no-encrypt and --key-file contradict each other")
    if name is not None:
        validate_name(name)
    mkey = _key(migration_key_file, migration_key_format, "migration key")
    state_key = _key(key_file, key_format, "state key")
    data = read_bundle_file(source)
    opts = ImportOptions(
        name=name,
        migration_key=mkey,
        encrypt=encrypt,
        state_key=state_key,
        key_source=None
        if key_file is None
        else ("passphrase" if key_format == KeyFormat.PASSPHRASE else "key-file"),
        transport=None if transport is None else Transport(transport),
    )
    done = import_bundle(Registry(), data, opts)
    inst, m = done.instance, done.manifest
    if as_json:
        print_json(
            {
                "format_version": FORMAT_VERSION,
                "name": inst.name,
                "state_dir": str(inst.paths.state_dir),
                "encrypted": inst.config.encrypted,
                "migration_key": inst.config.migration_key,
                "libtpms_version": done.libtpms_version,
                "notes": done.notes,
                "manifest": _manifest_record(m),
            }
        )
        return 0
    for note in done.notes:
        sys.stderr.write(f"vtpmctl: note: {safe(note)}\n")
    details = [
        f"TPM {m.tpm_version}",
        f"libtpms {m.libtpms_version or '?'} -> {done.libtpms_version or '?'}",
    ]
    if m.ek_fingerprints:
        details.append("EK " + ", ".join(sorted(m.ek_fingerprints)))
    details.append(
        f"encrypted at rest ({inst.meta.cipher})"
        if inst.config.encrypted
        else "not encrypted at rest"
    )
    sys.stdout.write(
        safe(
            f"imported {inst.name} from {m.source_name} on {m.source_host} "
            f"({'; '.join(details)}); start it with: vtpmctl start {inst.name}"
        )
        + "\n"
    )
    return 0


def _export_args(values: dict[str, Any]) -> dict[str, Any]:
    """FILE or -o FILE, once; a bundle on stdout leaves no room for --json."""
    destination, output = values.pop("destination"), values["output"]
    if (output is None) == (destination is None):
        raise UsageError("give where the bundle goes once: FILE, '-' for stdout, or -o FILE|-")
    where = output if output is not None else destination
    if where == "-" and values["as_json"]:
        raise UsageError("--json needs -o FILE (with -o - the bundle goes to stdout)")
    values["output"] = where
    return values


def _import_args(values: dict[str, Any]) -> dict[str, Any]:
    if values["encrypt"] is False and values["key_file"] is not None:
        raise UsageError("--no-encrypt and --key-file contradict each other")
    return values


def hand_over(name: str, host: str, as_json: bool = False) -> int:
    """Hand NAME's lease in its remote to HOST (the target of a live migration)."""
    from vtpmctl.store.instances import Registry
    from vtpmctl.store.lease import iso
    from vtpmctl.usecases.ownership import hand_over as give

    me, record = give(Registry().get(name), host)
    if as_json:
        print_json(
            {
                "format_version": FORMAT_VERSION,
                "name": name,
                "from_host": me,
                "to_host": host,
                "generation": record.generation,
                "until": iso(record.expires_ms),
            }
        )
        return 0
    from vtpmctl.commands.output import out

    out(
        f"handed the lease of {name} to host {host} until {iso(record.expires_ms)}: "
        f"start it there (vtpmctl start {name} --incoming for a live migration)"
    )
    return 0


_MIGRATION_KEY_FILE = decl.Param(
    "migration_key_file",
    decl.PATH,
    "--migration-key-file",
    help="migration key (0600) the bundle is, or is to be, encrypted with",
    show_default=False,
)

COMMANDS = (
    decl.Command(
        "migrate export",
        "vtpmctl.commands.migrate:export",
        "Write a stopped vTPM's state, EK data and manifest as a bundle.\n\n"
        "Encrypted with the instance's migration key, or --migration-key-file.",
        decl.NAME,
        decl.Param(
            "destination", decl.ARG, help="same as -o", metavar="[FILE|-]", show_default=False
        ),
        decl.Param(
            "output",
            decl.TEXT,
            "-o",
            "--output",
            help="where to write the bundle ('-' for stdout); files are created mode 0600",
            metavar="FILE|-",
            show_default=False,
        ),
        _MIGRATION_KEY_FILE,
        decl.MIGRATION_KEY_FORMAT,
        decl.Param(
            "allow_running",
            decl.SWITCH,
            "--allow-running",
            help="copy the permanent state of a running instance instead "
            "of refusing (the copy and the original then diverge)",
            default=False,
        ),
        decl.JSON,
        decl.STATE_KEY,
        adapt=_export_args,
    ),
    decl.Command(
        "migrate import",
        "vtpmctl.commands.migrate:import_",
        "Create a vTPM from a bundle; everything is checked before anything is written.",
        decl.Param(
            "source",
            decl.ARG,
            help="the bundle ('-' for stdin), or an instance in a configured remote",
            required=True,
            metavar="BUNDLE|-|s3://BUCKET/PREFIX/NAME",
            show_default=False,
        ),
        decl.Param(
            "name",
            decl.TEXT,
            "--name",
            help="instance name [default: the source's]",
            show_default=False,
        ),
        _MIGRATION_KEY_FILE,
        decl.MIGRATION_KEY_FORMAT,
        decl.Param(
            "encrypt",
            decl.SWITCH,
            "--encrypt/--no-encrypt",
            help="encrypt the state at rest here [default: as the source was; a new random "
            "key unless --key-file]",
            show_default=False,
        ),
        decl.Param(
            "key_file",
            decl.PATH,
            "--key-file",
            help="state key (0600) for encryption at rest; implies --encrypt",
            show_default=False,
        ),
        decl.KEY_FORMAT,
        decl.Param(
            "transport",
            decl.CHOICE,
            "--transport",
            help="socket or cuse [default: the source's]",
            choices=Transport,
            show_default=False,
        ),
        decl.JSON,
        adapt=_import_args,
    ),
    decl.Command(
        "migrate hand-over",
        "vtpmctl.commands.migrate:hand_over",
        "Hand a running vTPM's lease in its remote to another host (live migration).\n\n"
        "Only HOST may then start it; this host's daemon stops pushing its state.",
        decl.NAME,
        decl.Param(
            "host",
            decl.ARG,
            help="the target's host id: the host-id file in its config root (its `vtpmctl "
            "status` shows it as the holder of the leases it takes)",
            required=True,
            metavar="HOST",
            show_default=False,
        ),
        decl.JSON,
    ),
)


def register(app: typer.Typer) -> None:
    """Add the `migrate` group to the vtpmctl app."""
    import typer

    group = typer.Typer(
        name="migrate",
        no_args_is_help=True,
        help="Move a vTPM to another store or host as a verified bundle.",
    )
    decl.register(group, COMMANDS)
    app.add_typer(group)
