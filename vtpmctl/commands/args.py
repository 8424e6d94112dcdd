"""The arguments and options that many commands share, declared once.

Import it only inside a ``register()``: it imports typer, which the fast
route of the command line never loads.
"""

import inspect
from collections.abc import Callable

import typer

from vtpmctl.model import KEY_SPEC_HELP, KEY_SPEC_METAVAR

# A registered instance.
NAME = typer.Argument(metavar="NAME", show_default=False, help="instance name")

# Any TPM's control channel (vtpmctl.device.client.target parses it).
TARGET = typer.Argument(
    metavar="TARGET",
    show_default=False,
    help="/dev/vtpm-NAME, unix:PATH, tcp:HOST:PORT or an instance name",
)

JSON = typer.Option("--json", help="one JSON object on stdout")


def with_parameters(func: Callable[..., None], params: list[inspect.Parameter]) -> None:
    """Give ``func(**params)`` the signature typer reads, for commands built from a table."""
    func.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
    func.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}


# How a key file given with --key-file / --migration-key-file is read (KeyFormat).
KEY_FORMAT = typer.Option("--key-format", help="how to read --key-file")
MIGRATION_KEY_FORMAT = typer.Option(
    "--migration-key-format", help="how to read --migration-key-file"
)

# swtpm's --key / --migration-key syntax (vtpmctl.store.keys.parse_key_spec): a key
# or passphrase from a file or an inherited descriptor.
KEY = typer.Option("--key", metavar=KEY_SPEC_METAVAR, help=KEY_SPEC_HELP, show_default=False)
MIGRATION_KEY = typer.Option(
    "--migration-key",
    metavar=KEY_SPEC_METAVAR,
    help="the migration key, as --key",
    show_default=False,
)
