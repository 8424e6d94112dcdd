"""`vtpmctl swtpm-compat install|uninstall DIR`: swtpm's program names, answered by vtpmctl."""

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from vtpmctl.commands.output import safe
from vtpmctl.errors import EXIT_FAILURE, EXIT_OK

if TYPE_CHECKING:
    import typer

HELP = "Install or remove the swtpm, swtpm_setup and swtpm_ioctl launchers."


def install(directory: Path) -> int:
    """Write the launchers into DIR (never over a file vtpmctl did not write)."""
    import shutil

    from vtpmctl.usecases import swtpm_compat

    for change in swtpm_compat.install(directory):
        sys.stdout.write(f"{change.action} {safe(str(change.path))}\n")
    found = shutil.which("swtpm")
    mine = str(Path(directory).resolve() / "swtpm")
    if found is None or str(Path(found).resolve()) != mine:
        sys.stderr.write(
            f"vtpmctl: note: `swtpm` in this PATH is {safe(found or 'not found')}; put "
            f"{safe(str(directory))} before /usr/bin in the caller's PATH "
            "(see docs/swtpm-compat.md)\n"
        )
    user = swtpm_compat.libvirt_swtpm_user()
    why = user and swtpm_compat.cannot_run(Path(mine), user)
    if user and why:
        sys.stderr.write(
            f"vtpmctl: warning: libvirt runs swtpm as {safe(user)}, who cannot run "
            f"{safe(mine)} ({safe(why)}); install vtpmctl where {safe(user)} can read it "
            "(e.g. a checkout under /opt with scripts/setup) and run install again\n"
        )
    return EXIT_OK


def uninstall(directory: Path) -> int:
    """Remove vtpmctl's launchers from DIR; other files of those names are left alone."""
    from vtpmctl.usecases import swtpm_compat

    changes, foreign = swtpm_compat.uninstall(directory)
    for change in changes:
        if change.action == "removed":
            sys.stdout.write(f"removed {safe(str(change.path))}\n")
    for path in foreign:
        sys.stderr.write(f"vtpmctl: {safe(str(path))} is not a vtpmctl launcher; left alone\n")
    return EXIT_FAILURE if foreign else EXIT_OK


def register(app: "typer.Typer") -> None:
    """Add `swtpm-compat install|uninstall` to the vtpmctl app."""
    from typing import Annotated

    import typer

    group = typer.Typer(name="swtpm-compat", help=HELP, no_args_is_help=True)
    directory = typer.Argument(
        metavar="DIR", help="a directory in the caller's PATH, e.g. /usr/local/bin"
    )

    @group.command("install")
    def install_cmd(dir: Annotated[Path, directory]) -> None:
        """Write swtpm, swtpm_setup and swtpm_ioctl launchers into DIR."""
        raise typer.Exit(install(dir))

    @group.command("uninstall")
    def uninstall_cmd(dir: Annotated[Path, directory]) -> None:
        """Remove vtpmctl's launchers from DIR."""
        raise typer.Exit(uninstall(dir))

    app.add_typer(group)
