"""`vtpmctl snapshot create|list|restore|rm|diff`: points in a vTPM's life to go back to.

Plain functions do the work and return the exit code; ``register`` adds the
typer front ends. ``--json`` prints one object with ``format_version``.
"""

from __future__ import annotations

from vtpmctl.commands import decl
from vtpmctl.commands.output import note as _note
from vtpmctl.commands.output import out as _out
from vtpmctl.commands.output import print_json, safe
from vtpmctl.errors import EXIT_FAILURE, EXIT_OK
from vtpmctl.model import BlobKind

# `typing` costs more to import than a control round trip; annotations only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    import typer

    from vtpmctl.store.instances import Instance
    from vtpmctl.store.snapshots import Snapshot

FORMAT_VERSION = 1


def _instance(name: str, key: str | None = None) -> Instance:
    from vtpmctl.store.instance_keys import with_state_key
    from vtpmctl.store.instances import Registry

    return with_state_key(Registry().get(name), key)


def _record(snap: Snapshot | None) -> dict[str, Any] | None:
    return None if snap is None else snap.to_json()


def _size(n: int) -> str:
    return f"{n} B" if n < 10240 else f"{n / 1024:.0f} KiB"


def create(
    name: str,
    label: str | None = None,
    volatile: bool = False,
    keep: int | None = None,
    as_json: bool = False,
    key: str | None = None,
) -> int:
    """Snapshot NAME's state (running or stopped)."""
    from vtpmctl.usecases import snapshot_ops

    snap, captured, pruned = snapshot_ops.create(
        _instance(name, key), label=label, volatile=volatile, keep=keep
    )
    for note in captured.settled:
        _note(note)
    if as_json:
        print_json(
            {
                "instance": name,
                "snapshot": _record(snap),
                "source": captured.source,
                "note": captured.note,
                "pruned": [_record(s) for s in pruned],
            }
        )
        return 0
    kinds = " + ".join(k for k in BlobKind if k in snap.blobs)
    _out(f"snapshot {snap.describe()} of {name}: {kinds} state, from the {captured.source}")
    if captured.note:
        _note(captured.note)
    for s in pruned:
        _out(f"pruned snapshot {s.describe()}")
    return 0


def list_(name: str, as_json: bool = False, key: str | None = None) -> int:
    """NAME's snapshots, oldest first."""
    from vtpmctl.usecases import snapshot_ops

    store = snapshot_ops.open_store(_instance(name, key))
    snaps = store.all()
    apparent, allocated = store.disk_usage() if store.root.exists() else (0, 0)
    if as_json:
        print_json(
            {
                "instance": name,
                "snapshots": [s.to_json() for s in snaps],
                "disk_usage": {"bytes": apparent, "allocated": allocated},
            }
        )
        return 0
    if not snaps:
        _note(f"{name} has no snapshots; take one with: vtpmctl snapshot create {name}")
        return 0
    rows = [["ID", "CREATED", "LABEL", "STATE", "SIZE"]]
    for s in snaps:
        kinds = "+".join(k[:3] for k in BlobKind if k in s.blobs)
        rows.append(
            [
                str(s.id),
                snapshot_ops.timestamp(s.created),
                safe(s.label or ""),
                kinds,
                _size(sum(s.sizes.values())),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        _out("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    _out(f"{len(snaps)} snapshot(s), {_size(apparent)} in {store.root}")
    return 0


def restore(
    name: str,
    ref: str,
    force: bool = False,
    as_json: bool = False,
    key: str | None = None,
    tpmstate: str | None = None,
) -> int:
    """Make snapshot REF NAME's state again (a safety snapshot is taken first)."""
    from vtpmctl.usecases import snapshot_ops

    if tpmstate is not None:
        return _restore_to(name, ref, tpmstate, force, as_json, key)
    res = snapshot_ops.restore(_instance(name, key), ref, force=force)
    for note in res.settled:
        _note(note)
    if as_json:
        print_json(
            {
                "instance": name,
                "restored": _record(res.snapshot),
                "safety_snapshot": _record(res.safety),
                "safety_error": res.safety_error,
                "stopped": res.stopped,
                "restarted": res.restarted,
            }
        )
        return 0
    if res.safety is not None:
        _out(f"saved the current state as snapshot {res.safety.describe()}")
    else:
        _note(f"no safety snapshot: the current state is unreadable ({res.safety_error})")
    _out(f"restored {name} to snapshot {res.snapshot.describe()}")
    if res.restarted:
        _out(f"restarted {name}; the guest sees the restored TPM after its next reboot")
    return 0


def _restore_to(
    name: str, ref: str, tpmstate: str, force: bool, as_json: bool, key: str | None
) -> int:
    """``--tpmstate``: into the state files of a stopped swtpm another manager runs."""
    from vtpmctl.errors import UsageError
    from vtpmctl.store.keys import KeyFileError, parse_key_spec
    from vtpmctl.store.tpmstate import parse_tpmstate
    from vtpmctl.usecases import snapshot_ops

    if force:
        raise UsageError(
            "--force stops vtpmctl's own vTPMs; with --tpmstate the VM must be shut down first"
        )
    target = parse_tpmstate(tpmstate)
    try:
        source = None if key is None else parse_key_spec(key, "--key")
    except KeyFileError as exc:
        raise UsageError(str(exc)) from None
    res = snapshot_ops.restore_to(name, ref, target, source)
    if as_json:
        print_json(
            {
                "instance": name,
                "restored": _record(res.snapshot),
                "safety_snapshot": _record(res.safety),
                "tpmstate": {"backend": target.backend, "path": str(target.path)},
                "encrypted": res.encrypted,
                "volatile_removed": res.dropped_volatile,
            }
        )
        return 0
    if res.safety is not None:
        _out(f"saved the state that was there as snapshot {res.safety.describe()}")
    how = "encrypted" if res.encrypted else "not encrypted"
    _out(
        f"wrote snapshot {res.snapshot.describe()} of {name} to {target.path} "
        f"(permanent state, {how})"
    )
    _out(
        "the volatile state is not written"
        + (
            f" (the saved {', '.join(res.dropped_volatile)} state was removed)"
            if res.dropped_volatile
            else ""
        )
        + ": the guest sees a rebooted TPM when its VM starts"
    )
    return 0


def rm(name: str, ref: str, as_json: bool = False, key: str | None = None) -> int:
    """Delete snapshot REF (objects other snapshots share stay)."""
    from vtpmctl.usecases import snapshot_ops

    snap = snapshot_ops.open_store(_instance(name, key)).remove(ref)
    if as_json:
        print_json({"instance": name, "removed": _record(snap)})
    else:
        _out(f"removed snapshot {snap.describe()} of {name}")
    return 0


def diff(name: str, ref_a: str, ref_b: str, as_json: bool = False, key: str | None = None) -> int:
    """What changed from snapshot A to snapshot B."""
    from vtpmctl.usecases import snapshot_ops

    result = snapshot_ops.diff(_instance(name, key), ref_a, ref_b)
    if as_json:
        print_json({"instance": name, **result})
        return EXIT_FAILURE if result["error"] else EXIT_OK
    for kind, change in result["blobs"].items():
        _out(f"{kind:<10} {change}")
    for what in ("persistent", "nv"):
        changes = result[what]
        if changes["added"] is None:
            continue
        for handle in changes["added"]:
            _out(f"{what:<10} {handle} added")
        for handle in changes["removed"]:
            _out(f"{what:<10} {handle} removed")
        for entry in changes["changed"]:
            fields = entry.get("fields")
            _out(
                f"{what:<10} {entry['handle']} changed"
                + (f" ({', '.join(fields)})" if fields else "")
            )
    if result["error"]:
        _note(result["error"])
        return EXIT_FAILURE
    return EXIT_OK


_REF_HELP = "snapshot id or label"


def _ref(dest: str, metavar: str) -> decl.Param:
    return decl.Param(
        dest, decl.ARG, help=_REF_HELP, required=True, metavar=metavar, show_default=False
    )


COMMANDS = (
    decl.Command(
        "snapshot create",
        "vtpmctl.commands.snapshot:create",
        "Snapshot a vTPM, running (without stopping it) or stopped.",
        decl.NAME,
        decl.Param("label", decl.TEXT, "--label", help="a name to restore by"),
        decl.Param(
            "volatile",
            decl.SWITCH,
            "--volatile",
            help="also the volatile state (loaded objects, sessions, PCRs of the current boot)",
            default=False,
        ),
        decl.Param(
            "keep",
            decl.INT,
            "--keep",
            help="then keep only the newest N snapshots",
            min=1,
            metavar="N",
        ),
        decl.JSON,
        decl.STATE_KEY,
    ),
    decl.Command(
        "snapshot list",
        "vtpmctl.commands.snapshot:list_",
        "List a vTPM's snapshots, oldest first.",
        decl.NAME,
        decl.JSON,
        decl.STATE_KEY,
    ),
    decl.Command(
        "snapshot restore",
        "vtpmctl.commands.snapshot:restore",
        "Put a snapshot back as the vTPM's state (the current state is kept as a snapshot).",
        decl.NAME,
        _ref("ref", "REF"),
        decl.Param(
            "force",
            decl.SWITCH,
            "--force",
            help="stop the running vTPM first (and start it again after)",
            default=False,
        ),
        decl.Param(
            "tpmstate",
            decl.TEXT,
            "--tpmstate",
            help="write it into a stopped swtpm's state instead, given as that swtpm's "
            "--tpmstate (libvirt's or Proxmox's vTPM, while its VM is shut down)",
            metavar="dir=DIR|backend-uri=file://PATH",
            show_default=False,
        ),
        decl.JSON,
        decl.STATE_KEY,
    ),
    decl.Command(
        "snapshot rm",
        "vtpmctl.commands.snapshot:rm",
        "Delete a snapshot.",
        decl.NAME,
        _ref("ref", "REF"),
        decl.JSON,
        decl.STATE_KEY,
    ),
    decl.Command(
        "snapshot diff",
        "vtpmctl.commands.snapshot:diff",
        "Show which blobs, persistent handles and NV indexes changed from A to B.",
        decl.NAME,
        _ref("ref_a", "A"),
        _ref("ref_b", "B"),
        decl.JSON,
        decl.STATE_KEY,
    ),
)


def register(app: typer.Typer) -> None:
    """Add the `snapshot` group to the vtpmctl app."""
    import typer

    group = typer.Typer(
        name="snapshot",
        no_args_is_help=True,
        help="Take, list, restore and compare snapshots of a vTPM's state.",
    )
    decl.register(group, COMMANDS)
    app.add_typer(group)
