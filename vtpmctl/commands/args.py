"""The shared rows of ``commands/decl.py`` as typer objects, for typer-only commands.

Import it only inside a ``register()``: it imports typer, which the fast
route of the command line never loads. A command declared in
``commands/decl.py`` gets these from its rows; a command written for typer
alone uses them as ``Annotated[str, args.NAME]``.
"""

import inspect
from collections.abc import Callable

from vtpmctl.commands import decl

# A registered instance.
NAME = decl.NAME.typer_info()

# Any TPM's control channel (vtpmctl.device.client.target parses it).
TARGET = decl.TARGET.typer_info()

JSON = decl.JSON.typer_info()


def with_parameters(func: Callable[..., None], params: list[inspect.Parameter]) -> None:
    """Give ``func(**params)`` the signature typer reads, for commands built from a table."""
    func.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
    func.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}


# How a key file given with --key-file / --migration-key-file is read (KeyFormat).
KEY_FORMAT = decl.KEY_FORMAT.typer_info()
MIGRATION_KEY_FORMAT = decl.MIGRATION_KEY_FORMAT.typer_info()

# swtpm's --key / --migration-key syntax (vtpmctl.store.keys.parse_key_spec): a key
# or passphrase from a file or an inherited descriptor.
KEY = decl.KEY.typer_info()
MIGRATION_KEY = decl.MIGRATION_KEY.typer_info()
STATE_KEY = decl.STATE_KEY.typer_info()
