"""TARGET parsing: every spelling the command line accepts, and the one-line refusals."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from vtpmctl.device.client.control import SocketTransport, TargetError
from vtpmctl.device.client.target import Target, open_client, open_transport, parse_target
from vtpmctl.device.protocol import Cmd


@pytest.fixture
def unix_socket(tmp_path: Path) -> Iterator[Path]:
    """A real bound unix socket file (short path: AF_UNIX allows < 108 bytes)."""
    path = tmp_path / "s"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    try:
        yield path
    finally:
        sock.close()


@pytest.mark.parametrize(
    "spec, kind, path, host, port, display",
    [
        ("unix:/run/vtpm/x.ctrl", "unix", "/run/vtpm/x.ctrl", None, None, "unix:/run/vtpm/x.ctrl"),
        ("unix:relative.sock", "unix", "relative.sock", None, None, "unix:relative.sock"),
        ("unix:/a:b", "unix", "/a:b", None, None, "unix:/a:b"),
        ("tcp:127.0.0.1:2322", "tcp", None, "127.0.0.1", 2322, "tcp:127.0.0.1:2322"),
        ("tcp:localhost:1", "tcp", None, "localhost", 1, "tcp:localhost:1"),
        ("tcp:[::1]:2322", "tcp", None, "::1", 2322, "tcp:[::1]:2322"),
        (
            "tcp:[fe80::1%eth0]:65535",
            "tcp",
            None,
            "fe80::1%eth0",
            65535,
            "tcp:[fe80::1%eth0]:65535",
        ),
        ("/dev/vtpm-x", "cuse", "/dev/vtpm-x", None, None, "/dev/vtpm-x"),
        ("/dev/vtpm0", "cuse", "/dev/vtpm0", None, None, "/dev/vtpm0"),
    ],
)
def test_parse(
    spec: str, kind: str, path: str | None, host: str | None, port: int | None, display: str
) -> None:
    target = parse_target(spec)
    assert (target.kind, target.path, target.host, target.port) == (kind, path, host, port)
    assert target.display == display
    assert parse_target(target.display) == target  # the display form parses back


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty target"),
        ("unix:", "missing socket path"),
        ("tcp:", "missing host or port"),
        ("tcp:host", "missing host or port"),
        ("tcp::2322", "missing host or port"),
        ("tcp:host:", "port must be a number"),
        ("tcp:host:0", "port must be a number"),
        ("tcp:host:65536", "port must be a number"),
        ("tcp:host:23a", "port must be a number"),
        ("tcp:host:-1", "port must be a number"),
        ("tcp:host:²", "port must be a number"),
        ("tcp:::1:2322", "put an IPv6 address in brackets"),
        ("tcp:[::1]", "bad IPv6 address"),
        ("tcp:[]:1", "bad IPv6 address"),
        ("udp:host:1", "not a target"),
        ("-x", "not a target"),
        ("/nonexistent/dir/tpm.ctrl", "no such socket"),
        ("./nope.sock", "no such socket"),
        ("myvm", "no instance named myvm; see vtpmctl list"),
        ("my-vm_2.test", "no instance named my-vm_2.test"),
    ],
)
def test_refused(spec: str, message: str) -> None:
    with pytest.raises(TargetError) as err:
        parse_target(spec)
    text = str(err.value)
    assert message in text
    assert "\n" not in text


def test_plain_socket_path(unix_socket: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_target(str(unix_socket)) == Target("unix", path=str(unix_socket))
    monkeypatch.chdir(unix_socket.parent)
    # A relative path names the socket only with a slash (or unix:).
    assert parse_target("./" + unix_socket.name) == Target("unix", path="./" + unix_socket.name)
    assert parse_target("unix:" + unix_socket.name) == Target("unix", path=unix_socket.name)


def test_bare_word_is_an_instance_even_if_a_socket_has_its_name(
    unix_socket: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A socket planted in the current directory never stands in for an instance."""
    monkeypatch.setenv("VTPMCTL_HOME", str(unix_socket.parent / "home"))
    monkeypatch.chdir(unix_socket.parent)
    with pytest.raises(TargetError, match=f"no instance named {unix_socket.name}"):
        parse_target(unix_socket.name)


def test_plain_path_that_is_not_a_socket(tmp_path: Path) -> None:
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(TargetError, match="not a socket"):
        parse_target(str(regular))
    with pytest.raises(TargetError, match="not a socket"):
        parse_target(str(tmp_path))


def test_cuse_target_opens_the_device_lazily() -> None:
    from vtpmctl.device.client.ioctl import DeviceTransport

    transport = open_transport("/dev/vtpm-nothere")
    assert isinstance(transport, DeviceTransport)
    with pytest.raises(TargetError, match="no such device"):
        transport.call(Cmd.GET_CAPABILITY)


def test_open_transport_connects_lazily() -> None:
    transport = open_transport("unix:/nonexistent/ctrl", timeout=3)
    assert isinstance(transport, SocketTransport)
    assert transport.name == "unix:/nonexistent/ctrl"
    assert transport.timeout == 3
    client = open_client(Target("tcp", host="::1", port=9))
    assert client.name == "tcp:[::1]:9"
    client.close()
    with pytest.raises(TargetError, match="no such socket"):
        transport.connect()
