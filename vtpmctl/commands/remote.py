"""`vtpmctl remote add|list|rm|ls|rotate-key`, `vtpmctl push` and `vtpmctl pull`.

A remote is a bucket and prefix of an S3-compatible object store shared by
the hosts of a fleet (docs/remotes.md). boto3 is imported only when one of
these commands talks to a remote.
"""

from pathlib import Path
from typing import TYPE_CHECKING

from vtpmctl.commands.output import note, out, print_json, print_table

if TYPE_CHECKING:
    import typer

    from vtpmctl.store.blob import AesKey

FORMAT_VERSION = 1


def _fleet_key(key_file: Path | None, key_fd: int | None) -> "AesKey | None":
    from vtpmctl.errors import UsageError
    from vtpmctl.store.instance_keys import read_user_key
    from vtpmctl.store.keys import KeyFileError
    from vtpmctl.store.remote.config import RemoteConfigError, read_key_fd

    if key_file is not None and key_fd is not None:
        raise UsageError("give the fleet key once: --key-file FILE or --key-fd N")
    try:
        if key_file is not None:
            return read_user_key(key_file, "auto")
        if key_fd is not None:
            return read_key_fd(key_fd)
    except KeyFileError as exc:
        raise RemoteConfigError(f"fleet key: {exc}") from None
    return None


def add(
    name: str,
    url: str,
    endpoint: str | None = None,
    region: str | None = None,
    profile: str | None = None,
    key_file: Path | None = None,
    key_fd: int | None = None,
    as_json: bool = False,
) -> int:
    """Check the remote at URL and record it as NAME with its fleet key."""
    from vtpmctl.usecases.remote import add_remote

    key = _fleet_key(key_file, key_fd)
    done = add_remote(name, url, endpoint=endpoint, region=region, profile=profile, fleet_key=key)
    if as_json:
        print_json(
            {
                "format_version": FORMAT_VERSION,
                "remote": done.remote.to_json(),
                "fleet": done.fleet,
                "generated_key": done.generated_key,
                "key_file": done.key_path,
            }
        )
        return 0
    r = done.remote
    how = "joined its fleet" if done.fleet == "joined" else "set up a new fleet"
    out(f"added remote {r.name} ({r.url}); {how} with fleet key {r.fleet_key}")
    if done.generated_key:
        note(
            f"a new fleet key was made at {done.key_path}; the other hosts of this remote "
            "need a copy (vtpmctl remote add … --key-file COPY)"
        )
    return 0


def list_(as_json: bool = False) -> int:
    """The remotes this host knows."""
    from vtpmctl.store.remote.config import RemoteRegistry

    remotes = RemoteRegistry().all()
    if as_json:
        print_json({"format_version": FORMAT_VERSION, "remotes": [r.to_json() for r in remotes]})
        return 0
    if not remotes:
        note("no remotes; add one with: vtpmctl remote add NAME s3://BUCKET/PREFIX")
        return 0
    print_table(
        ["NAME", "URL", "ENDPOINT", "REGION", "PROFILE", "FLEET KEY"],
        [
            [r.name, r.url, r.endpoint or "-", r.region or "-", r.profile or "-", r.fleet_key]
            for r in remotes
        ],
    )
    return 0


def rm(name: str, as_json: bool = False) -> int:
    """Forget NAME here (its objects stay in the bucket)."""
    from vtpmctl.usecases.remote import remove_remote

    remote = remove_remote(name)
    if as_json:
        print_json({"format_version": FORMAT_VERSION, "removed": remote.to_json()})
        return 0
    out(f"removed remote {remote.name} ({remote.url}) and its fleet key from this host")
    return 0


def register(app: "typer.Typer") -> None:
    """Add the `remote` group and the `push`/`pull` commands."""
    from typing import Annotated

    import typer

    from vtpmctl.commands import args

    group = typer.Typer(
        name="remote",
        no_args_is_help=True,
        help="S3-compatible remotes that hosts of a fleet share (docs/remotes.md).",
    )

    @group.command("add")
    def add_cmd(
        name: Annotated[str, typer.Argument(metavar="NAME", help="remote name")],
        url: Annotated[str, typer.Argument(metavar="s3://BUCKET/PREFIX", help="where")],
        endpoint: Annotated[
            str | None,
            typer.Option(
                "--endpoint",
                metavar="URL",
                show_default=False,
                help="S3 endpoint (Ceph RGW, MinIO, SeaweedFS) [default: AWS, or AWS_ENDPOINT_URL]",
            ),
        ] = None,
        region: Annotated[
            str | None,
            typer.Option("--region", show_default=False, help="[default: the AWS chain's]"),
        ] = None,
        profile: Annotated[
            str | None,
            typer.Option(
                "--profile",
                show_default=False,
                help="AWS profile for credentials [default: the AWS chain's]",
            ),
        ] = None,
        key_file: Annotated[
            Path | None,
            typer.Option(
                "--key-file",
                show_default=False,
                help="the fleet key (0600, hex or raw) [default: the remote's is required; "
                "a new remote gets a new random key]",
            ),
        ] = None,
        key_fd: Annotated[
            int | None,
            typer.Option(
                "--key-fd", metavar="N", show_default=False, help="read the fleet key from fd N"
            ),
        ] = None,
        as_json: Annotated[bool, args.JSON] = False,
    ) -> None:
        """Check a bucket and prefix and record them as a remote, with the fleet key.

        Credentials come from the AWS chain (environment, ~/.aws, --profile);
        vtpmctl never stores them.
        """
        raise typer.Exit(add(name, url, endpoint, region, profile, key_file, key_fd, as_json))

    @group.command("list")
    def list_cmd(as_json: Annotated[bool, args.JSON] = False) -> None:
        """List the remotes this host knows."""
        raise typer.Exit(list_(as_json))

    @group.command("rm")
    def rm_cmd(
        name: Annotated[str, typer.Argument(metavar="NAME", help="remote name")],
        as_json: Annotated[bool, args.JSON] = False,
    ) -> None:
        """Forget a remote and its fleet key on this host; the bucket is not touched."""
        raise typer.Exit(rm(name, as_json))

    app.add_typer(group)
