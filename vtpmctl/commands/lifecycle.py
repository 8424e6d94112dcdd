"""`vtpmctl create|start|stop|restart|rm|list|status`: named vTPMs, day to day.

Plain functions do the work and return the exit code; ``register`` adds the
typer front ends. ``status`` exits with LSB codes (0 running, 3 stopped,
1 dead but stale files left, 4 no such instance).
"""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path

from vtpmctl.commands import decl
from vtpmctl.commands.output import note as _note
from vtpmctl.commands.output import out as _out
from vtpmctl.commands.output import print_json, print_rows, print_table
from vtpmctl.errors import EXIT_FAILURE, LSB_STATUS, InstanceError, NoSuchInstance
from vtpmctl.model import KeyFormat, OnShutdown, TpmFamily, Transport

# `typing` costs more to import than a control round trip; annotations only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    import typer

    from vtpmctl.store.instances import Instance
    from vtpmctl.store.keys import KeySource
    from vtpmctl.usecases.supervisor import Status

FORMAT_VERSION = 1


class EccCurve(StrEnum):
    P384 = "p384"
    P256 = "p256"


def _registry() -> Any:
    from vtpmctl.store.instances import Registry

    return Registry()


# ---------------------------------------------------------------- records


def _endpoints(inst: Instance) -> dict[str, str | None]:
    p = inst.paths
    if inst.config.transport == Transport.CUSE:
        return {"ctrl": None, "data": None, "device": str(p.device)}
    # A --ctrl-only or --incoming daemon has no data socket (QEMU passes its own),
    # nor has a power-off one (it is for a hypervisor).
    data = f"unix:{p.data_socket}" if p.data_socket.exists() or not p.ctrl_socket.exists() else None
    if inst.config.on_shutdown == OnShutdown.POWER_OFF:
        data = None
    return {"ctrl": f"unix:{p.ctrl_socket}", "data": data, "device": None}


def instance_record(inst: Instance, st: Status) -> dict[str, Any]:
    """One instance as status --json and list --json show it (stable keys)."""
    p = inst.paths
    socket = inst.config.transport == Transport.SOCKET
    return {
        "name": inst.name,
        "state": st.state,
        "pid": st.pid,
        "owner": inst.owner or (None if st.pid is None else ("vtpmctl" if st.ours else "other")),
        "tpm": inst.config.tpm,
        "transport": inst.config.transport,
        "encrypted": inst.config.encrypted,
        "migration_key": inst.config.migration_key,
        "ek": inst.config.ek,
        "created": inst.meta.created or None,
        "libtpms_version": inst.meta.libtpms_version,
        "state_dir": str(p.state_dir),
        "endpoints": _endpoints(inst),
        "tcti": None
        if p.attached
        else (f"swtpm:path={p.data_socket}" if socket else f"device:{p.device}"),
        "log_file": None if p.attached else str(p.log_file),
        "pid_file": None if p.attached else str(p.pid_file),
        "stale_files": [str(f) for f in st.leftovers],
        "replication": _replication(inst, st),
        "error": None,
    }


def _replication(inst: Instance, st: Status) -> dict[str, Any] | None:
    """The remote an instance is bound to, its lease and its replication lag; None if unbound."""
    if not inst.paths.binding_file.exists():
        return None
    from vtpmctl.usecases.ownership import status_record

    return status_record(inst, st.state == "running")


def _broken_record(name: str, error: str) -> dict[str, Any]:
    keys = (
        "pid",
        "owner",
        "tpm",
        "transport",
        "encrypted",
        "migration_key",
        "ek",
        "created",
        "libtpms_version",
        "state_dir",
        "endpoints",
        "tcti",
        "log_file",
        "pid_file",
    )
    return {
        "name": name,
        "state": "unknown",
        **dict.fromkeys(keys),
        "stale_files": [],
        "replication": None,
        "error": error,
    }


# ---------------------------------------------------------------- output


# how `list` colours a state on a terminal
_STATE_STYLES = {"running": "green", "stale": "red", "unknown": "red"}


# ---------------------------------------------------------------- commands


def create(
    name: str,
    tpm: str = "2",
    transport: str = "socket",
    ek: bool | None = None,
    encrypt: bool = False,
    key_file: Path | None = None,
    key_format: str = KeyFormat.AUTO,
    migration_key_file: Path | None = None,
    migration_key_format: str = KeyFormat.AUTO,
    ecc_curve: str = "p384",
    key: str | None = None,
    migration_key: str | None = None,
    group: str | None = None,
    socket_mode: str | None = None,
    dir_mode: str | None = None,
    on_shutdown: str | None = None,
    replicate: str | None = None,
    replicate_interval: float | None = None,
    lease_duration: float | None = None,
    lease_renew: float | None = None,
    allow_plaintext: bool = False,
) -> int:
    """Register NAME and manufacture its TPM."""
    from vtpmctl.usecases.create import CreateOptions, create_instance

    tuning = (replicate_interval, lease_duration, lease_renew, allow_plaintext)
    _check_replication(replicate, *tuning)  # before anything is made

    state_source, migration_source = _key_sources(key, key_file, migration_key, migration_key_file)

    opts = CreateOptions(
        tpm=TpmFamily(tpm),
        transport=Transport(transport),
        ek=ek,
        encrypt=encrypt,
        key_file=key_file,
        key_format=KeyFormat(key_format),
        migration_key_file=migration_key_file,
        migration_key_format=KeyFormat(migration_key_format),
        ecc_curve=ecc_curve,
        key_source=state_source,
        migration_key_source=migration_source,
        group=group,
        socket_mode=socket_mode,
        dir_mode=dir_mode,
        on_shutdown=None if on_shutdown is None else OnShutdown(on_shutdown),
    )
    inst = create_instance(_registry(), name, opts)
    extras = []
    if inst.config.ek:
        extras.append("EK " + ", ".join(sorted(inst.meta.ek_fingerprints)))
    if inst.config.encrypted:
        extras.append(f"encrypted ({inst.meta.cipher})")
    if inst.config.group is not None:
        extras.append(
            f"sockets {inst.config.socket_mode} group {inst.config.group}, "
            f"run dir {inst.config.dir_mode}"
        )
    if inst.config.on_shutdown == OnShutdown.POWER_OFF:
        extras.append("outlives VM runs (on shutdown: power-off)")
    if replicate is not None:
        from vtpmctl.errors import VtpmctlError
        from vtpmctl.usecases.ownership import OwnershipError

        try:
            _bind(inst, replicate, *tuning)
        except VtpmctlError as exc:
            raise OwnershipError(
                f"created {name}, but did not bind it to {replicate}: {exc}"
            ) from None
        extras.append(f"bound to remote {replicate}")
    detail = "; ".join([f"TPM {inst.config.tpm}", *extras])
    _out(f"created {name} ({detail})")
    return 0


def _check_replication(
    replicate: str | None,
    interval: float | None,
    lease: float | None,
    renew: float | None,
    allow_plaintext: bool,
) -> None:
    """The tuning options of a binding go with --replicate; REMOTE must be known here."""
    if replicate is None:
        if allow_plaintext or any(v is not None for v in (interval, lease, renew)):
            from vtpmctl.errors import UsageError

            raise UsageError(
                "--replicate-interval, --lease-duration, --lease-renew and --allow-plaintext "
                "go with --replicate REMOTE"
            )
        return
    from vtpmctl.store.remote.config import RemoteRegistry

    RemoteRegistry().get(replicate)


def _bind(
    inst: Instance,
    replicate: str,
    interval: float | None,
    lease: float | None,
    renew: float | None,
    allow_plaintext: bool,
) -> None:
    from vtpmctl.usecases.ownership import bind

    bind(
        inst,
        replicate,
        interval=interval,
        lease=lease,
        renew=renew,
        allow_plaintext=allow_plaintext,
    )


def _key_sources(
    key: str | None,
    key_file: Path | None,
    migration_key: str | None,
    migration_key_file: Path | None,
) -> tuple[KeySource | None, KeySource | None]:
    """The --key / --migration-key values (swtpm's syntax), parsed; nothing is read yet."""
    from vtpmctl.errors import UsageError
    from vtpmctl.store.keys import KeyFileError, parse_key_spec

    sources: list[KeySource | None] = []
    for flag, spec, path in (
        ("--key", key, key_file),
        ("--migration-key", migration_key, migration_key_file),
    ):
        if spec is not None and path is not None:
            raise UsageError(f"give {flag} or {flag}-file, not both")
        try:
            sources.append(None if spec is None else parse_key_spec(spec, flag))
        except KeyFileError as exc:
            raise UsageError(str(exc)) from None
    return sources[0], sources[1]


def start(
    name: str,
    incoming: bool = False,
    foreground: bool = False,
    ctrl_only: bool = False,
    delete_volatile: bool = False,
    key: str | None = None,
    migration_key: str | None = None,
    take_over: bool = False,
    replicate: str | None = None,
    replicate_interval: float | None = None,
    lease_duration: float | None = None,
    lease_renew: float | None = None,
    allow_plaintext: bool = False,
    group: str | None = None,
    socket_mode: str | None = None,
    dir_mode: str | None = None,
    on_shutdown: str | None = None,
) -> int:
    """Start NAME's daemon and return when its control channel answers."""
    from vtpmctl.usecases import supervisor

    state_source, migration_source = _key_sources(key, None, migration_key, None)
    keys = supervisor.DaemonKeys(state_source, migration_source)
    inst = _registry().get(name)
    tuning = (replicate_interval, lease_duration, lease_renew, allow_plaintext)
    _check_replication(replicate, *tuning)
    if take_over and replicate is None and not inst.paths.binding_file.exists():
        from vtpmctl.errors import UsageError

        raise UsageError(
            f"{name} is not bound to a remote, so it has no lease to take over; "
            f"bind it with --replicate REMOTE"
        )
    if replicate is not None:
        _bind(inst, replicate, *tuning)
    supervisor.reconfigure(
        inst,
        group=group,
        socket_mode=socket_mode,
        dir_mode=dir_mode,
        on_shutdown=None if on_shutdown is None else OnShutdown(on_shutdown),
    )
    if foreground:
        supervisor.exec_foreground(
            inst,
            incoming=incoming,
            ctrl_only=ctrl_only,
            delete_volatile=delete_volatile,
            keys=keys,
            take_over=take_over,
        )
        return EXIT_FAILURE  # exec_foreground only returns by raising
    started = supervisor.start(
        inst,
        incoming=incoming,
        ctrl_only=ctrl_only,
        delete_volatile=delete_volatile,
        keys=keys,
        take_over=take_over,
    )
    for note in started.notes:
        _note(note)
    if started.already:
        _out(f"{name} is already running (pid {started.pid})")
    else:
        _out(f"started {name} (pid {started.pid})")
    return 0


def stop(name: str, force: bool = False) -> int:
    """Stop NAME's daemon (CMD_SHUTDOWN; --force escalates to signals)."""
    from vtpmctl.usecases import supervisor

    pid = supervisor.stop(_registry().get(name), force=force)
    _out(f"{name} is not running" if pid is None else f"stopped {name} (pid {pid})")
    return 0


def restart(
    name: str, force: bool = False, key: str | None = None, migration_key: str | None = None
) -> int:
    from vtpmctl.usecases import supervisor

    # The keys are parsed before the stop: a bad --key must not leave NAME stopped.
    state_source, migration_source = _key_sources(key, None, migration_key, None)
    inst = _registry().get(name)
    supervisor.stop(inst, force=force)
    started = supervisor.start(inst, keys=supervisor.DaemonKeys(state_source, migration_source))
    _out(f"restarted {name} (pid {started.pid})")
    return 0


def rm(name: str, yes: bool = False) -> int:
    """Delete NAME and its TPM state for good (it must be stopped)."""
    from vtpmctl.store.statedir import StateDir
    from vtpmctl.usecases.supervisor import LifecycleError, busy_error

    registry = _registry()
    paths = registry.paths(name)
    if not paths.base.exists():
        raise NoSuchInstance(f"no instance named {name}; see vtpmctl list")
    if not yes:
        if not sys.stdin.isatty():
            raise LifecycleError(f"removing {name} destroys its TPM for good; add --yes to confirm")
        sys.stderr.write(f"Remove {name} and its TPM state for good? [y/N] ")
        sys.stderr.flush()
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            _note("not removed")
            return EXIT_FAILURE
    sd = StateDir(paths.state_dir)
    if paths.state_dir.exists() and not sd.lock(0):
        raise busy_error(name, paths.state_dir)
    try:
        registry.remove(name)
    finally:
        sd.unlock()
    _out(f"removed {name}")
    return 0


def list_(as_json: bool = False, quiet: bool = False) -> int:
    """Every instance with its state."""
    from vtpmctl.usecases.supervisor import probe

    registry = _registry()
    records = []
    for name in registry.names():
        try:
            inst = registry.get(name)
            records.append(instance_record(inst, probe(inst)))
        except (InstanceError, OSError) as exc:
            records.append(_broken_record(name, str(exc)))
    for inst in registry.attached():  # run by libvirt, Proxmox, …: shown, never taken over
        records.append(instance_record(inst, probe(inst)))
    if quiet:
        for r in records:
            _out(r["name"])
        return 0
    if as_json:
        print_json({"format_version": FORMAT_VERSION, "instances": records})
        return 0
    if not records:
        _note("no instances; create one with: vtpmctl create NAME")
        return 0
    rows = []
    for r in records:
        ep = r["endpoints"] or {}
        rows.append(
            [
                r["name"],
                r["state"],
                str(r["pid"] or "-"),
                r["owner"] or "-",  # who runs it: vtpmctl, or the manager of an attached one
                r["tpm"] or "?",
                "yes" if r["encrypted"] else "no",
                (ep.get("device") or ep.get("ctrl") or r["error"] or ""),
            ]
        )
    print_table(
        ["NAME", "STATE", "PID", "OWNER", "TPM", "ENCRYPTED", "ENDPOINT"], rows, _STATE_STYLES
    )
    return 0


def status(name: str, as_json: bool = False) -> int:
    """NAME's state; exit 0 running, 3 stopped, 1 stale, 4 unknown instance."""
    from vtpmctl.usecases.supervisor import probe

    try:
        inst = _registry().get(name)
    except InstanceError as exc:
        if as_json:
            print_json({"format_version": FORMAT_VERSION, **_broken_record(name, str(exc))})
        _note(str(exc))
        return exc.lsb_code
    st = probe(inst)
    record = instance_record(inst, st)
    if as_json:
        print_json({"format_version": FORMAT_VERSION, **record})
        return LSB_STATUS[st.state]
    state: str = st.state
    if st.state == "running":
        state += f" (pid {st.pid})" if st.ours else f" by pid {st.pid}, not a vtpmctl daemon"
    elif st.state == "stale":
        state = "dead (stale files left; `vtpmctl start` cleans them)"
    ep = record["endpoints"]
    rows = [("state", state), ("TPM", record["tpm"]), ("transport", record["transport"])]
    if ep["device"]:
        rows.append(("device", ep["device"]))
    else:
        rows += [
            ("control", ep["ctrl"] or "-"),
            ("data", ep["data"] or "-"),
            ("TCTI", record["tcti"] or "-"),
        ]
    rows += [
        ("encrypted", f"yes ({inst.meta.cipher})" if inst.config.encrypted else "no"),
        ("on shutdown", str(inst.config.on_shutdown)),
        ("EK", ", ".join(sorted(inst.meta.ek_fingerprints)) or "none"),
        ("created", record["created"] or "?"),
        ("state dir", record["state_dir"]),
        ("log", record["log_file"] or "-"),
    ]
    if record["replication"] is not None:
        rows += _replication_rows(record["replication"])
    if inst.owner:
        rows.insert(1, ("run by", inst.owner))
    print_rows(name, rows)
    return LSB_STATUS[st.state]


def _replication_rows(rep: dict[str, Any]) -> list[tuple[str, str]]:
    what = "replicated" if rep["replicate"] else "lease only"
    rows = [("remote", f"{rep['remote']} ({what}, at most every {rep['interval']:g}s)")]
    lease = rep.get("lease")
    if lease is not None:
        if lease["lost"]:
            held = f"LOST (generation {lease['generation']}): another host took it over"
        elif lease["expires"] is None:
            held = "released"
        else:
            held = (
                f"held by {lease['holder']} until {lease['expires']} "
                f"(generation {lease['generation']})"
            )
        rows.append(("lease", held))
    if rep.get("lag_seconds") is not None:
        lag = f"{rep['lag_seconds']:.1f}s"
        lag += f" (last push {rep['last_push']})" if rep["last_push"] else " (nothing pushed yet)"
        rows.append(("replication lag", lag))
    if rep.get("error"):
        rows.append(("remote error", rep["error"]))
    return rows


# ---------------------------------------------------------------- command line

_FORCE = decl.Param(
    "force",
    decl.SWITCH,
    "--force",
    help="if it does not stop cleanly: SIGTERM, then SIGKILL",
    default=False,
)

# Binding to a remote (docs/remotes.md): `create` and `start` take the same options.
_REPLICATION = (
    decl.Param(
        "replicate",
        decl.TEXT,
        "--replicate",
        help="bind to REMOTE: one host at a time runs it (a lease there), and its "
        "permanent state is pushed there after each change (kept for later starts)",
        metavar="REMOTE",
    ),
    decl.Param(
        "replicate_interval",
        decl.FLOAT,
        "--replicate-interval",
        help="at most one push per interval: the NV changes a dead host may lose [default: 5]",
        metavar="SECONDS",
    ),
    decl.Param(
        "lease_duration",
        decl.FLOAT,
        "--lease-duration",
        help="how long the lease lasts unless renewed [default: 60]",
        metavar="SECONDS",
    ),
    decl.Param(
        "lease_renew",
        decl.FLOAT,
        "--lease-renew",
        help="how often the daemon renews the lease [default: a third of its duration]",
        metavar="SECONDS",
    ),
    decl.Param(
        "allow_plaintext",
        decl.SWITCH,
        "--allow-plaintext",
        help="replicate an instance that is not encrypted at rest",
        default=False,
    ),
)

COMMANDS = (
    decl.Command(
        "create",
        "vtpmctl.commands.lifecycle:create",
        "Create a named vTPM: manufacture it, provision EKs, keep its state.",
        decl.NAME,
        decl.Param(
            "tpm",
            decl.CHOICE,
            "--tpm",
            help="TPM family",
            choices=TpmFamily,
            default=TpmFamily.TPM2,
        ),
        decl.Param(
            "transport",
            decl.CHOICE,
            "--transport",
            help="control/data sockets, or a CUSE device /dev/vtpm-NAME",
            choices=Transport,
            default=Transport.SOCKET,
        ),
        decl.Param(
            "ek",
            decl.SWITCH,
            "--ek/--no-ek",
            help="provision EKs and certificates [default: on for TPM 2.0]",
            show_default=False,
        ),
        decl.Param(
            "encrypt",
            decl.SWITCH,
            "--encrypt",
            help="encrypt the state at rest (a new random key unless --key-file)",
            default=False,
        ),
        decl.Param(
            "key_file",
            decl.PATH,
            "--key-file",
            help="state key (0600): hex or binary AES key, or a passphrase "
            "file with --key-format passphrase; implies --encrypt",
        ),
        decl.KEY_FORMAT,
        decl.Param(
            "migration_key_file",
            decl.PATH,
            "--migration-key-file",
            help="key (0600) that encrypts exported state blobs",
        ),
        decl.MIGRATION_KEY_FORMAT,
        decl.Param(
            "ecc_curve",
            decl.CHOICE,
            "--ecc-curve",
            help="curve of the ECC EK (p384 at 0x81010016 as swtpm_setup; p256 at 0x8101000a)",
            choices=EccCurve,
            default=EccCurve.P384,
        ),
        decl.KEY,
        decl.MIGRATION_KEY,
        *decl.HYPERVISOR,
        *_REPLICATION,
    ),
    decl.Command(
        "start",
        "vtpmctl.commands.lifecycle:start",
        "Start a vTPM's daemon; returns when its control channel answers.",
        decl.NAME,
        decl.Param(
            "incoming",
            decl.SWITCH,
            "--incoming",
            help="wait for QEMU's state (incoming migration)",
            default=False,
        ),
        decl.Param(
            "foreground",
            decl.SWITCH,
            "--foreground",
            help="run the daemon in this process (systemd Type=notify)",
            default=False,
        ),
        decl.Param(
            "ctrl_only",
            decl.SWITCH,
            "--ctrl-only",
            help="no data socket: for QEMU -tpmdev emulator, which passes its own data channel",
            default=False,
        ),
        decl.Param(
            "delete_volatile",
            decl.SWITCH,
            "--delete-volatile",
            help="first delete the saved volatile state: the TPM starts as after a reboot, "
            "NV data kept",
            default=False,
        ),
        decl.KEY,
        decl.MIGRATION_KEY,
        decl.Param(
            "take_over",
            decl.SWITCH,
            "--take-over",
            help="take the remote's lease from a host that let it expire (a dead host)",
            default=False,
        ),
        *_REPLICATION,
        *decl.HYPERVISOR,
    ),
    decl.Command(
        "stop",
        "vtpmctl.commands.lifecycle:stop",
        "Stop a vTPM's daemon (its state is saved).",
        decl.NAME,
        _FORCE,
    ),
    decl.Command(
        "restart",
        "vtpmctl.commands.lifecycle:restart",
        "Stop and start a vTPM's daemon.",
        decl.NAME,
        decl.Param("force", decl.SWITCH, "--force", help="as for stop", default=False),
        decl.KEY,
        decl.MIGRATION_KEY,
    ),
    decl.Command(
        "rm",
        "vtpmctl.commands.lifecycle:rm",
        "Delete a stopped vTPM and its state, keys and logs.",
        decl.NAME,
        decl.Param("yes", decl.SWITCH, "--yes", "-y", help="do not ask", default=False),
    ),
    decl.Command(
        "list",
        "vtpmctl.commands.lifecycle:list_",
        "List the vTPMs and their state.",
        decl.JSON,
        decl.Param("quiet", decl.SWITCH, "--quiet", "-q", help="names only", default=False),
    ),
    decl.Command(
        "status",
        "vtpmctl.commands.lifecycle:status",
        "Show a vTPM's state and endpoints; exit 0 running, 3 stopped, 1 stale.",
        decl.NAME,
        decl.JSON,
    ),
)


def register(app: typer.Typer) -> None:
    """Add create, start, stop, restart, rm, list and status to the vtpmctl app."""
    decl.register(app, COMMANDS)
