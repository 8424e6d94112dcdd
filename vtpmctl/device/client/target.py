"""TARGET strings of the command line, turned into a transport.

A TARGET names one TPM's control channel: ``unix:PATH``, ``tcp:HOST:PORT``
(``tcp:[::1]:PORT`` for IPv6), a CUSE device ``/dev/NAME``, a socket path
with a slash in it (``./x.sock``), or the NAME of a registered instance.
A bare word is always an instance name: a socket that happens to carry the
name in the current directory (say, another user's in /tmp) never wins.
"""

from __future__ import annotations

import os
import stat

from vtpmctl import model
from vtpmctl.device.client.control import (
    DEFAULT_TIMEOUT,
    ControlClient,
    SocketTransport,
    TargetError,
)

# `typing` costs more to import than a control round trip; annotations only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Literal

    from vtpmctl.device.client.control import Transport
    from vtpmctl.store.instances import Instance

    Kind = Literal["unix", "tcp", "cuse"]

_FORMS = "use unix:PATH, tcp:HOST:PORT, /dev/NAME or an instance name"


class Target:
    """A parsed TARGET: where the control channel is and how to show it.

    ``via`` is the socket actually used when it is not ``path``: an instance's
    admin endpoint, for commands that only read (see ``parse_target``).
    """

    __slots__ = ("kind", "path", "host", "port", "via")

    def __init__(
        self,
        kind: Kind,
        path: str | None = None,
        host: str | None = None,
        port: int | None = None,
        via: str | None = None,
    ) -> None:
        self.kind: Kind = kind
        self.path = path
        self.host = host
        self.port = port
        self.via = via

    @property
    def display(self) -> str:
        """The canonical TARGET spelling, as used in messages and --json output."""
        if self.kind == "tcp":
            return (
                f"tcp:[{self.host}]:{self.port}"
                if ":" in (self.host or "")
                else f"tcp:{self.host}:{self.port}"
            )
        if self.kind == "unix":
            return f"unix:{self.path}"
        return str(self.path)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Target):
            return NotImplemented
        return (self.kind, self.path, self.host, self.port) == (
            other.kind,
            other.path,
            other.host,
            other.port,
        )

    def __hash__(self) -> int:
        return hash((self.kind, self.path, self.host, self.port))

    def __repr__(self) -> str:
        return f"Target({self.display!r})"


def parse_target(spec: str, read_only: bool = False, changes: bool = False) -> Target:
    """Parse a TARGET; instance names are looked up in the registry.

    ``read_only``: the caller sends only commands the admin endpoint answers, so an
    instance is reached through it, and answers while a hypervisor holds its
    control channel. ``changes``: the caller changes the TPM (ctl, state import),
    which vtpmctl does not do by name to a vTPM another manager runs.
    """
    if not spec:
        raise TargetError(f"empty target; {_FORMS}")
    if spec.startswith("unix:"):
        path = spec[5:]
        if not path:
            raise TargetError(f"{spec!r}: missing socket path; use unix:PATH", spec)
        return Target("unix", path=path)
    if spec.startswith("tcp:"):
        return _parse_tcp(spec)
    if spec.startswith("/dev/"):
        return Target("cuse", path=spec)
    if "/" in spec:
        if _is_socket(spec):
            return Target("unix", path=spec)
        if os.path.exists(spec):
            raise TargetError(
                f"{spec}: not a socket; give the TPM's control socket (or a /dev/ device)", spec
            )
        raise TargetError(
            f"{spec}: no such socket; is the TPM running? (check the path, or start it)", spec
        )
    if ":" in spec or spec.startswith("-"):
        raise TargetError(f"{spec!r}: not a target; {_FORMS}", spec)
    return resolve_instance(spec, read_only, changes)


def _parse_tcp(spec: str) -> Target:
    rest = spec[4:]
    if rest.startswith("["):
        host, sep, port_s = rest[1:].partition("]:")
        if not sep or not host:
            raise TargetError(f"{spec!r}: bad IPv6 address; use tcp:[ADDR]:PORT", spec)
    else:
        host, sep, port_s = rest.rpartition(":")
        if not sep or not host:
            raise TargetError(f"{spec!r}: missing host or port; use tcp:HOST:PORT", spec)
        if ":" in host:
            raise TargetError(f"{spec!r}: put an IPv6 address in brackets: tcp:[ADDR]:PORT", spec)
    if not (port_s.isascii() and port_s.isdigit()) or not 0 < int(port_s) < 65536:
        raise TargetError(f"{spec!r}: port must be a number from 1 to 65535", spec)
    return Target("tcp", host=host, port=int(port_s))


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def resolve_instance(name: str, read_only: bool = False, changes: bool = False) -> Target:
    """The control channel of the registered instance NAME (``via`` its admin endpoint
    when ``read_only`` and its daemon has one)."""
    from vtpmctl.errors import InstanceError
    from vtpmctl.store.instances import Registry

    try:
        inst = Registry().get(name)
    except InstanceError as exc:
        raise TargetError(str(exc), name) from None
    if changes and inst.paths.attached:
        raise TargetError(
            f"{name} is a vTPM that {inst.owner} runs; vtpmctl does not change it by name "
            f"(its manager does): to send it this anyway, give unix:{inst.paths.ctrl_socket}",
            name,
        )
    target = instance_target(inst, read_only)
    if not os.path.exists(target.path or ""):
        raise TargetError(f"{name} is not running; start it with: vtpmctl start {name}", name)
    return target


def instance_target(inst: Instance, read_only: bool = False) -> Target:
    """Where an instance's control channel is (its CUSE device or control socket).

    With ``read_only``, ``via`` is its admin endpoint if the daemon has one (a
    daemon of an earlier version has none and is reached on its control socket).
    """
    if inst.config.transport == model.Transport.CUSE:
        return Target("cuse", path=str(inst.paths.device))
    admin = str(inst.paths.admin_socket)
    via = admin if read_only and _is_socket(admin) else None
    return Target("unix", path=str(inst.paths.ctrl_socket), via=via)


def cuse_transport(path: str, *, timeout: float = DEFAULT_TIMEOUT) -> Transport:
    """The ioctl transport for a CUSE device such as /dev/vtpm-x."""
    from vtpmctl.device.client.ioctl import DeviceTransport

    return DeviceTransport(path, timeout=timeout)


def open_transport(target: Target | str, *, timeout: float = DEFAULT_TIMEOUT) -> Transport:
    """A transport for a target; nothing is connected until the first command."""
    if isinstance(target, str):
        target = parse_target(target)
    if target.kind == "unix":
        assert target.path is not None
        return SocketTransport(target.via or target.path, timeout=timeout, name=target.display)
    if target.kind == "tcp":
        assert target.host is not None and target.port is not None
        return SocketTransport((target.host, target.port), timeout=timeout, name=target.display)
    assert target.path is not None
    return cuse_transport(target.path, timeout=timeout)


def open_client(target: Target | str, *, timeout: float = DEFAULT_TIMEOUT) -> ControlClient:
    """A ControlClient for a TARGET string or a parsed Target."""
    return ControlClient(open_transport(target, timeout=timeout))
