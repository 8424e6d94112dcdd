"""`vtpmctl remote add|list|rm|ls|rotate-key|unbind|gc`, `vtpmctl push` and `vtpmctl pull`.

A remote is a bucket and prefix of an S3-compatible object store shared by
the hosts of a fleet (docs/remotes.md). boto3 is imported only when one of
these commands talks to a remote.
"""

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vtpmctl.commands import decl
from vtpmctl.commands.output import note, out, print_json, print_table

if TYPE_CHECKING:
    import typer

    from vtpmctl.store.blob import AesKey
    from vtpmctl.usecases.remote import Progress, Pulled

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


def unbind(name: str, as_json: bool = False) -> int:
    """Stop replicating NAME (stopped): it runs on this host alone from then on."""
    from vtpmctl.store.instances import Registry
    from vtpmctl.usecases.ownership import unbind as unbind_instance

    old = unbind_instance(Registry().get(name))
    if as_json:
        print_json({"format_version": FORMAT_VERSION, "name": name, "remote": old.remote})
        return 0
    out(
        f"{name} no longer replicates to {old.remote}; what it pushed and its lease stay "
        f"there (bind it again with: vtpmctl start {name} --replicate {old.remote})"
    )
    return 0


@contextlib.contextmanager
def _progress(what: str, as_json: bool) -> "Iterator[Progress | None]":
    """A transfer bar on stderr when a person watches it; nothing for scripts."""
    if as_json or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(what, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _size(n: int) -> str:
    """Bytes for people: B below a KiB, else KiB or MiB with one decimal."""
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / (1024 * 1024):.1f} MiB"


def push(
    name: str, remote: str | None = None, allow_plaintext: bool = False, as_json: bool = False
) -> int:
    """Upload NAME to REMOTE (or the only remote): new objects, then its index."""
    from vtpmctl.usecases import remote as uc

    with _progress(f"push {name}", as_json) as progress:
        done = uc.push(name, remote, allow_plaintext=allow_plaintext, progress=progress)
    if as_json:
        print_json(
            {
                "format_version": FORMAT_VERSION,
                "name": done.name,
                "remote": done.remote.name,
                "url": done.remote.url,
                "generation": done.generation,
                "source_state": done.source_state,
                "objects": done.objects,
                "uploaded": done.uploaded,
                "uploaded_bytes": done.uploaded_bytes,
                "index_bytes": done.index_bytes,
                "size": done.size,
                "snapshots": done.snapshots,
                "notes": done.notes,
            }
        )
        return 0
    for text in done.notes:
        note(text)
    out(
        f"pushed {done.name} to {done.remote.name} ({done.remote.url}) as generation "
        f"{done.generation}: {done.uploaded} of {done.objects} objects uploaded "
        f"({_size(done.uploaded_bytes)} of {_size(done.size)}), {done.snapshots} snapshots"
    )
    return 0


def _pulled(done: "Pulled", as_json: bool) -> int:
    if as_json:
        print_json(
            {
                "format_version": FORMAT_VERSION,
                "name": done.name,
                "source_name": done.source_name,
                "remote": done.remote.name,
                "url": done.remote.url,
                "generation": done.generation,
                "pushed": done.pushed,
                "pushed_by": done.host,
                "size": done.size,
                "snapshots": done.snapshots,
                "encrypted": done.encrypted,
                "libtpms_version": done.libtpms_version,
                "notes": done.notes,
            }
        )
        return 0
    for text in done.notes:
        note(text)
    out(
        f"pulled {done.source_name} from {done.remote.name} (generation {done.generation}, "
        f"pushed {done.pushed} by {done.host}) as {done.name}: {_size(done.size)}, "
        f"{done.snapshots} snapshots, "
        + ("encrypted at rest" if done.encrypted else "not encrypted at rest")
        + f"; start it with: vtpmctl start {done.name}"
    )
    return 0


def pull(
    name: str, remote: str | None = None, new_name: str | None = None, as_json: bool = False
) -> int:
    """Register NAME from REMOTE after checking all of it."""
    from vtpmctl.usecases import remote as uc

    with _progress(f"pull {name}", as_json) as progress:
        done = uc.pull(name, remote, new_name=new_name, progress=progress)
    return _pulled(done, as_json)


def pull_url(url: str, new_name: str | None = None, as_json: bool = False) -> int:
    """`migrate import s3://BUCKET/PREFIX/NAME`: a pull from the remote of that bucket/prefix."""
    from vtpmctl.store.remote.config import RemoteConfigError, RemoteRegistry, parse_url
    from vtpmctl.usecases import remote as uc

    bucket, path = parse_url(url)
    prefix, _, name = path.rpartition("/")
    if not name:
        raise RemoteConfigError(f"{url} names no instance; write s3://BUCKET/PREFIX/NAME")
    found = RemoteRegistry().find_url(bucket, prefix)
    with _progress(f"pull {name}", as_json) as progress:
        done = uc.pull(name, new_name=new_name, progress=progress, remote=found)
    return _pulled(done, as_json)


def ls(remote: str | None = None, as_json: bool = False) -> int:
    """The instances in REMOTE: who pushed them, their lease, their size."""
    from vtpmctl.usecases.remote import list_remote

    where, found = list_remote(remote)
    if as_json:
        records: list[dict[str, Any]] = [
            {
                "name": x.name,
                "generation": x.generation,
                "pushed": x.pushed,
                "pushed_by": x.host,
                "tpm": x.tpm,
                "encrypted": x.encrypted,
                "snapshots": x.snapshots,
                "size": x.size,
                "lease": x.lease,
            }
            for x in found
        ]
        print_json(
            {
                "format_version": FORMAT_VERSION,
                "remote": where.name,
                "url": where.url,
                "instances": records,
            }
        )
        return 0
    if not found:
        note(f"no instances in {where.name} ({where.url}); push one with: vtpmctl push NAME")
        return 0
    rows = []
    for x in found:
        lease = x.lease
        owner = str(lease.get("holder") or "-")
        state = str(lease.get("state"))
        if lease.get("expires"):
            state += f" until {lease['expires']}"
        rows.append([x.name, owner, state, x.host, x.pushed, str(x.snapshots), _size(x.size)])
    print_table(["NAME", "OWNER", "LEASE", "PUSHED BY", "PUSHED", "SNAPSHOTS", "SIZE"], rows)
    return 0


def rotate_key(
    name: str,
    new_key_file: Path | None = None,
    new_key_fd: int | None = None,
    as_json: bool = False,
) -> int:
    """Re-wrap every instance key of remote NAME with a new fleet key."""
    from vtpmctl.errors import UsageError
    from vtpmctl.usecases.remote import rotate_fleet_key

    key = _fleet_key(new_key_file, new_key_fd)
    if key is None:
        raise UsageError("give the new fleet key: --new-key-file FILE or --new-key-fd N")
    done = rotate_fleet_key(name, key)
    if as_json:
        print_json(
            {
                "format_version": FORMAT_VERSION,
                "remote": done.remote.name,
                "old_fleet_key": done.old,
                "fleet_key": done.new,
                "key_objects": done.key_objects,
            }
        )
        return 0
    out(
        f"remote {done.remote.name} now uses fleet key {done.new} (was {done.old}); "
        f"{done.key_objects} instance key objects re-wrapped"
    )
    note(
        "the other hosts of this remote need the new key: vtpmctl remote rm "
        f"{done.remote.name} && vtpmctl remote add {done.remote.name} {done.remote.url} "
        "--key-file NEWKEY"
    )
    return 0


GC_AGE = 86400  # seconds an unreferenced object is kept: a push in flight may own it


def gc(
    remote: str | None = None,
    older_than: int = GC_AGE,
    dry_run: bool = False,
    as_json: bool = False,
) -> int:
    """Delete the objects of REMOTE that no index or lease names any more."""
    from vtpmctl.usecases.remote import collect_garbage

    done = collect_garbage(remote, older_than=older_than, dry_run=dry_run)
    if as_json:
        print_json(
            {
                "format_version": FORMAT_VERSION,
                "remote": done.remote.name,
                "url": done.remote.url,
                "dry_run": done.dry_run,
                "older_than": done.older_than,
                "instances": done.instances,
                "objects": done.objects,
                "live": done.live,
                "collected": done.collected,
                "collected_bytes": done.collected_bytes,
                "kept_recent": done.kept_recent,
                "kept_recent_bytes": done.kept_recent_bytes,
                "unrecognised": done.unrecognised,
            }
        )
        return 0
    verb = "would delete" if done.dry_run else "deleted"
    out(
        f"{done.remote.name} ({done.remote.url}): {verb} {done.collected} unreferenced objects "
        f"({_size(done.collected_bytes)}); {done.live} of {done.objects} objects are in use "
        f"by {done.instances} instances"
    )
    if done.kept_recent:
        note(
            f"kept {done.kept_recent} unreferenced objects ({_size(done.kept_recent_bytes)}) "
            f"younger than {done.older_than} s: a push may be uploading them"
        )
    if done.unrecognised:
        note(f"left alone {done.unrecognised} objects vtpmctl does not write")
    return 0


_REMOTE = decl.Param(
    "remote",
    decl.ARG,
    help="remote name [default: the only remote]",
    metavar="[REMOTE]",
    show_default=False,
)
_REMOTE_NAME = decl.Param(
    "name", decl.ARG, help="remote name", required=True, metavar="NAME", show_default=False
)

GROUP = (
    decl.Command(
        "remote add",
        "vtpmctl.commands.remote:add",
        "Check a bucket and prefix and record them as a remote, with the fleet key.\n\n"
        "Credentials come from the AWS chain (environment, ~/.aws, --profile); "
        "vtpmctl never stores them.",
        _REMOTE_NAME,
        decl.Param(
            "url",
            decl.ARG,
            help="where the fleet's vTPMs are kept",
            required=True,
            metavar="s3://BUCKET/PREFIX",
            show_default=False,
        ),
        decl.Param(
            "endpoint",
            decl.TEXT,
            "--endpoint",
            help="S3 endpoint (Ceph RGW, MinIO, SeaweedFS) [default: AWS, or AWS_ENDPOINT_URL]",
            metavar="URL",
            show_default=False,
        ),
        decl.Param(
            "region", decl.TEXT, "--region", help="[default: the AWS chain's]", show_default=False
        ),
        decl.Param(
            "profile",
            decl.TEXT,
            "--profile",
            help="AWS profile for credentials [default: the AWS chain's]",
            show_default=False,
        ),
        decl.Param(
            "key_file",
            decl.PATH,
            "--key-file",
            help="the fleet key (0600, hex or raw) [default: the remote's is required; "
            "a new remote gets a new random key]",
            show_default=False,
        ),
        decl.Param(
            "key_fd",
            decl.INT,
            "--key-fd",
            help="read the fleet key from descriptor N",
            metavar="N",
            min=0,
            show_default=False,
        ),
        decl.JSON,
    ),
    decl.Command(
        "remote list",
        "vtpmctl.commands.remote:list_",
        "List the remotes this host knows.",
        decl.JSON,
    ),
    decl.Command(
        "remote rm",
        "vtpmctl.commands.remote:rm",
        "Forget a remote and its fleet key on this host; the bucket is not touched.",
        _REMOTE_NAME,
        decl.JSON,
    ),
    decl.Command(
        "remote rotate-key",
        "vtpmctl.commands.remote:rotate_key",
        "Re-wrap the instance keys in a remote with a new fleet key (nothing else moves).\n\n"
        "Run it again with the same key to finish an interrupted rotation.",
        _REMOTE_NAME,
        decl.Param(
            "new_key_file",
            decl.PATH,
            "--new-key-file",
            help="the new fleet key (0600, hex or raw)",
            show_default=False,
        ),
        decl.Param(
            "new_key_fd",
            decl.INT,
            "--new-key-fd",
            help="read the new fleet key from descriptor N",
            metavar="N",
            min=0,
            show_default=False,
        ),
        decl.JSON,
    ),
    decl.Command(
        "remote unbind",
        "vtpmctl.commands.remote:unbind",
        "Stop replicating a stopped vTPM to its remote; the bucket is not touched.",
        decl.NAME,
        decl.JSON,
    ),
    decl.Command(
        "remote ls",
        "vtpmctl.commands.remote:ls",
        "List the instances in a remote with owner, lease state and size.",
        _REMOTE,
        decl.JSON,
    ),
    decl.Command(
        "remote gc",
        "vtpmctl.commands.remote:gc",
        "Delete the objects of a remote that no index or lease names any more.\n\n"
        "Every index and lease is read (and checked) first; if one cannot be, nothing is "
        "deleted. A push uploads its objects before its index, so objects younger than "
        "--older-than are kept: keep it longer than any push or replication takes.",
        _REMOTE,
        decl.Param(
            "older_than",
            decl.INT,
            "--older-than",
            help="delete only unreferenced objects older than this",
            default=GC_AGE,
            metavar="SECONDS",
            min=0,
        ),
        decl.Param(
            "dry_run",
            decl.SWITCH,
            "--dry-run",
            help="report what would be deleted; delete nothing",
            default=False,
        ),
        decl.JSON,
    ),
)

TRANSFERS = (
    decl.Command(
        "push",
        "vtpmctl.commands.remote:push",
        "Upload a vTPM (state, EK data, snapshots) to a remote; only new objects travel.",
        decl.NAME,
        _REMOTE,
        decl.Param(
            "allow_plaintext",
            decl.SWITCH,
            "--allow-plaintext",
            help="push an instance that is not encrypted at rest (its TPM state then lies "
            "in the bucket in plaintext)",
            default=False,
        ),
        decl.JSON,
    ),
    decl.Command(
        "pull",
        "vtpmctl.commands.remote:pull",
        "Create a vTPM here from a remote; everything is checked before anything is written.",
        decl.NAME,
        _REMOTE,
        decl.Param(
            "new_name", decl.TEXT, "--name", help="local name [default: NAME]", show_default=False
        ),
        decl.JSON,
    ),
)

COMMANDS = GROUP + TRANSFERS  # what cli.ROUTES finds for remote, push and pull


def register(app: "typer.Typer") -> None:
    """Add the `remote` group and the `push`/`pull` commands."""
    import typer

    group = typer.Typer(
        name="remote",
        no_args_is_help=True,
        help="S3-compatible remotes that hosts of a fleet share (docs/remotes.md).",
    )
    decl.register(group, GROUP)
    app.add_typer(group)
    decl.register(app, TRANSFERS)
