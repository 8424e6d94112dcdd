"""vTPMs that swtpm-compatible programs run for other managers (libvirt, Proxmox, …).

libvirt and Proxmox start ``swtpm socket`` themselves (the real one or
vtpmctl's compatible one) on state dirs or linear state files (Proxmox's
volumes) they own. vtpmctl does not take those over; it finds them so that
``list`` shows them and ``snapshot``, ``verify``, ``migrate export`` and ``ek
export`` can read them through their control channel. A running ``swtpm``
names everything needed on its command line (``--tpmstate``, ``--ctrl``,
``--tpm2``, ``--key``), which ``/proc/PID/cmdline`` gives. It holds its state
for as long as it lives: a state dir's lock says so, and for a linear file
(unlocked by default, as Proxmox runs it) the process itself does
(``vtpmctl.store.linearfile.HeldFile``). Nothing is written here: the
instance is the process, and it is gone with it; ``serving`` and ``users``
say whether a stopped one's state location is free again (``snapshot restore
--tpmstate``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from vtpmctl.childproc import own_pids

PROGRAM = "swtpm"
SUBCOMMANDS = ("socket", "chardev", "cuse")
# Managers recognised by where they put the control socket: (pattern, name prefix, owner).
MANAGERS = (
    (re.compile(r"^/(?:var/)?run/libvirt/qemu/swtpm/\d+-(.+)-swtpm\.sock$"), "libvirt-", "libvirt"),
    (re.compile(r"^/(?:var/)?run/qemu-server/(\d+)\.swtpm$"), "pve-", "proxmox"),
)
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class Attached:
    """One running swtpm-compatible process and what its command line says."""

    name: str
    pid: int
    owner: str
    program: str
    state_dir: Path  # the state dir, or the linear state file when ``state_file``
    ctrl: Path
    tpm2: bool
    encrypted: bool
    migration_key: bool
    state_file: bool = False  # --tpmstate backend-uri=file://: a file or block device


def _options(args: list[str]) -> dict[str, str]:
    """``--name value`` and ``--name=value`` pairs; flags map to ""."""
    found: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("--"):
            continue
        name, eq, value = arg[2:].partition("=")
        if not eq and i < len(args) and not args[i].startswith("-"):
            value = args[i]
            i += 1
        found[name] = value
    return found


def _fields(value: str) -> dict[str, str]:
    return dict(item.partition("=")[::2] for item in value.split(",") if item)


def _state(value: str) -> tuple[Path, bool] | None:
    """The state's path, and whether it is a linear file (not a dir)."""
    fields = _fields(value)
    if "dir" in fields:
        return Path(fields["dir"]), False
    uri = fields.get("backend-uri", "")
    for scheme, is_file in (("dir://", False), ("file://", True)):
        if uri.startswith(scheme) and len(uri) > len(scheme):
            return Path(uri.removeprefix(scheme)), is_file
    return None


def _user(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def parse(pid: int, argv: list[str], uid: int, parent: str) -> Attached | None:
    """The instance a command line describes, or None if it is not a swtpm serving a state."""
    start = next((i for i, a in enumerate(argv[:2]) if os.path.basename(a) == PROGRAM), None)
    if start is None or len(argv) <= start + 1 or argv[start + 1] not in SUBCOMMANDS:
        return None
    options = _options(argv[start + 2 :])
    state = _state(options.get("tpmstate", ""))
    if state is None:
        return None
    ctrl_fields = _fields(options.get("ctrl", ""))
    if ctrl_fields.get("type") != "unixio" or "path" not in ctrl_fields:
        return None  # reachable only through its manager (a passed fd, TCP)
    ctrl = Path(ctrl_fields["path"])
    # the manager, else the parent (a daemonized swtpm's is init: the user alone)
    name, owner = f"swtpm-{pid}", f"{parent} ({_user(uid)})" if parent else _user(uid)
    for pattern, prefix, manager in MANAGERS:
        m = pattern.match(str(ctrl))
        if m:
            name, owner = prefix + _UNSAFE.sub("_", m.group(1)), f"{manager} ({_user(uid)})"
            break
    return Attached(
        name=name[:64],
        pid=pid,
        owner=owner,
        program=argv[start],
        state_dir=state[0],
        ctrl=ctrl,
        tpm2="tpm2" in options,
        encrypted="key" in options,
        migration_key="migration-key" in options,
        state_file=state[1],
    )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def discover(proc: Path = Path("/proc")) -> list[Attached]:
    """Every running swtpm-compatible process serving a state dir or file, by name."""
    found: dict[str, Attached] = {}
    try:
        pids = [int(p) for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return []
    for pid in sorted(pids):
        raw = _read(proc / str(pid) / "cmdline")
        if b"swtpm" not in raw:
            continue
        argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
        try:
            uid = os.stat(proc / str(pid)).st_uid
        except OSError:
            continue
        ppid_line = next(
            (
                ln
                for ln in _read(proc / str(pid) / "status").splitlines()
                if ln.startswith(b"PPid:")
            ),
            b"PPid: 0",
        )
        ppid = int(ppid_line.split()[1])
        parent = (
            _read(proc / str(ppid) / "comm").decode(errors="replace").strip() if ppid > 1 else ""
        )
        item = parse(pid, argv, uid, parent)
        if item is not None and item.name not in found:
            found[item.name] = item
    return sorted(found.values(), key=lambda a: a.name)


def find(name: str) -> Attached | None:
    return next((a for a in discover() if a.name == name), None)


def serving(state: Path) -> Attached | None:
    """The swtpm-compatible process serving ``state`` (a dir or linear file), if any runs."""
    want = os.path.realpath(state)
    return next((a for a in discover() if os.path.realpath(a.state_dir) == want), None)


def users(path: Path, proc: Path = Path("/proc")) -> list[int]:
    """Pids of the other processes that have ``path`` (a file or device node) open."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    want = (st.st_dev, st.st_ino)
    found = []
    ours = own_pids()
    for pid in (p for p in os.listdir(proc) if p.isdigit() and int(p) not in ours):
        try:
            fds = os.listdir(proc / pid / "fd")
        except OSError:
            continue  # gone, or another user's that this user may not look into
        for fd in fds:
            try:
                fst = os.stat(proc / pid / "fd" / fd)
            except OSError:
                continue
            if (fst.st_dev, fst.st_ino) == want:
                found.append(int(pid))
                break
    return found
