"""`vtpmctl key rotate`: re-encrypt a stopped instance's state under a new key."""

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from vtpmctl.commands.output import safe
from vtpmctl.errors import InstanceError
from vtpmctl.model import KeyFormat

if TYPE_CHECKING:
    import typer


class KeyCommandError(InstanceError):
    """The key could not be changed; nothing on disk was."""


def rotate(name: str, new_key_file: Path, key_format: str = KeyFormat.AUTO) -> int:
    """Switch NAME to the key in NEW_KEY_FILE (all or nothing, even across a crash)."""
    from vtpmctl.store import instance_keys
    from vtpmctl.store.instances import Registry
    from vtpmctl.store.keys import KeyFileError, key_fingerprint
    from vtpmctl.store.pending import settle
    from vtpmctl.store.snapshots import SnapshotError
    from vtpmctl.store.statedir import StateDirError

    registry = Registry()
    inst = registry.get(name)
    if inst.paths.attached:
        raise KeyCommandError(
            f"{name} is a vTPM that {inst.owner} runs; vtpmctl never re-encrypts its state "
            "(its key is its manager's)"
        )
    try:
        new_key = instance_keys.read_user_key(new_key_file, key_format)
    except KeyFileError as exc:
        raise KeyCommandError(f"new key: {exc}") from None
    sd = inst.statedir()
    if not sd.lock(0):
        raise KeyCommandError(
            f"{name} is running (pid {sd.holder_pid()}); stop it first: vtpmctl stop {name}"
        )
    try:
        # a restore staged under the old key must be settled before the key changes
        settled = settle(inst.paths, inst.config.tpm2)
        for note in settled.notes:
            sys.stderr.write(f"vtpmctl: {safe(note)}\n")
        if settled.rotation is not None:
            inst = registry.get(name)
        source = "passphrase" if key_format == KeyFormat.PASSPHRASE else "key-file"
        instance_keys.rotate(inst, new_key, source)
    except (KeyFileError, StateDirError, SnapshotError) as exc:
        raise KeyCommandError(f"cannot rotate the key of {name}: {exc}") from None
    finally:
        sd.unlock()
    sys.stdout.write(
        f"re-encrypted {name} with the new key ({new_key.cipher}, fingerprint "
        f"{key_fingerprint(new_key)})\n"
    )
    return 0


def register(app: "typer.Typer") -> None:
    """Add the `key` group to the vtpmctl app."""
    from typing import Annotated

    import typer

    from vtpmctl.commands import args

    group = typer.Typer(
        name="key", no_args_is_help=True, help="Manage an instance's state encryption key."
    )

    @group.command("rotate")
    def rotate_cmd(
        name: Annotated[str, args.NAME],
        new_key_file: Annotated[
            Path,
            typer.Option(
                "--new-key-file",
                show_default=False,
                help="the new key (0600): hex or binary AES key, or a passphrase file",
            ),
        ],
        key_format: Annotated[
            KeyFormat, typer.Option("--key-format", help="how to read --new-key-file")
        ] = KeyFormat.AUTO,
    ) -> None:
        """Re-encrypt a stopped instance's state with a new key, atomically."""
        raise typer.Exit(rotate(name, new_key_file, key_format.value))

    app.add_typer(group)
