"""Lifecycle of ``vtpmctl serve``: how it ends, how it starts, and what it refuses to start.

A process that ends (CMD_SHUTDOWN or SIGTERM) exits 0 and leaves no socket, pid file or
lock behind. A state dir that held a TPM never silently gets a new one: a missing or
corrupt permall makes INIT fail visibly, as it does in swtpm.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerStartError, VtpmServer, launch_vtpm, stop_vtpm
from rawsock import connect, exchange, h, read_exact

GET_RANDOM = h("80 01 00 00 00 0c 00 00 01 7b 00 08")
TPM2_STARTUP_CLEAR = h("80 01 00 00 00 0c 00 00 01 44 00 00")
TPM2_FATAL = h("80 01 00 00 00 0a 00 00 01 01")
INIT_FAILED = {
    True: b"TPM result from PTM_INIT: 0x101\n",  # TPM_RC_FAILURE
    False: b"TPM result from PTM_INIT: 0x9\n",
}  # TPM_FAIL
FAMILIES = [pytest.param(True, id="tpm2"), pytest.param(False, id="tpm12")]


def permall(state: Path, tpm2: bool = True) -> Path:
    return state / ("tpm2-00.permall" if tpm2 else "tpm-00.permall")


def tpm_command(server: Any, command: bytes) -> bytes:
    with connect(server.data, timeout=20) as sock:
        sock.sendall(command)
        head = read_exact(sock, 10, timeout=20)
        return head + read_exact(sock, int.from_bytes(head[2:6], "big") - 10)


def lock_is_free(state: Path) -> bool:
    fd = os.open(state / ".lock", os.O_WRONLY)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        assert exc.errno in (errno.EACCES, errno.EAGAIN)
        return False
    finally:
        os.close(fd)
    return True


def assert_cleaned_up(server: VtpmServer) -> None:
    assert server.proc.wait(10) == 0, server.log_text()[-2000:]
    for ep in (server.ctrl, server.data):
        if ep is not None and ep.kind == "unix":
            assert ep.path is not None and not ep.path.exists()
    assert not server.pid_file.exists()
    assert lock_is_free(server.state_dir)


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_cmd_shutdown_exits_0_and_cleans_up(
    transport: str, vtpm_server: Callable[..., Any]
) -> None:
    server = vtpm_server(ctrl=transport, data=transport, flags="not-need-init,startup-clear")
    assert int(server.pid_file.read_text()) == server.proc.pid
    assert not lock_is_free(server.state_dir)
    with connect(server.data) as idle_data_client, connect(server.ctrl) as ctrl:
        assert idle_data_client.fileno() >= 0
        reply = exchange(ctrl, h("00 00 00 03"))
    assert reply.data == bytes(4) and reply.closed
    assert_cleaned_up(server)
    assert permall(server.state_dir).exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_signal_exits_0_and_cleans_up(signum: int, vtpm_server: Callable[..., Any]) -> None:
    """Also with a control client and a data client connected and idle."""
    server = vtpm_server(flags="not-need-init,startup-clear")
    assert len(tpm_command(server, GET_RANDOM)) == 20
    with connect(server.ctrl) as ctrl, connect(server.data) as data:
        ctrl.sendall(h("00 00 00 01"))
        read_exact(ctrl, 8)
        data.sendall(GET_RANDOM)
        read_exact(data, 20)
        server.proc.send_signal(signum)
        assert_cleaned_up(server)


def test_sigterm_is_not_held_back_by_a_stalled_client(vtpm_server: Callable[..., Any]) -> None:
    """A control client stalls in the middle of a 100 kB state blob: SIGTERM still ends the
    process at once (the server waits up to 10 s for such a client otherwise)."""
    server = vtpm_server()
    with connect(server.ctrl) as ctrl:
        ctrl.sendall(h("00 00 00 0d 00 00 00 00 00 00 00 01 00 01 86 a0") + bytes(5000))
        time.sleep(0.3)  # the server is now reading the rest of the blob
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert_cleaned_up(server)
        assert time.monotonic() - started < 3


def test_shutdown_writes_state_for_the_next_start(
    tmp_path: Path, vtpm_server: Callable[..., Any]
) -> None:
    """SIGTERM on a started TPM 2 leaves a state the next process resumes (no new TPM)."""
    state = tmp_path / "state"
    first = vtpm_server(state, flags="not-need-init,startup-clear")
    first.tpm2("nvdefine", "0x1500030", "-C", "o", "-s", "8", "-a", "ownerread|ownerwrite")
    first.terminate()
    second = vtpm_server(state, flags="not-need-init,startup-clear", extra_args=["--existing"])
    assert b"0x1500030" in second.tpm2("getcap", "handles-nv-index").stdout


@pytest.mark.parametrize(
    ("flags", "get_random_rc"),
    [
        ("not-need-init,startup-clear", b"\0\0\0\0"),
        ("not-need-init", b"\0\0\x01\x00"),  # TPM_RC_INITIALIZE: running, not started
        (None, TPM2_FATAL[6:]),  # not running before CMD_INIT
    ],
)
def test_flags(
    flags: str | None,
    get_random_rc: bytes,
    tmp_path: Path,
    vtpm_server: Callable[..., Any],
    swtpm_server: Callable[..., Any],
    manufactured: Callable[[bool, Path], Path],
) -> None:
    """What GetRandom gets right after start, without any CMD_INIT; the same as swtpm."""
    ours = vtpm_server(manufactured(True, tmp_path / "ours"), flags=flags)
    peer = swtpm_server(manufactured(True, tmp_path / "swtpm"), flags=flags)
    mine, theirs = tpm_command(ours, GET_RANDOM), tpm_command(peer, GET_RANDOM)
    assert mine[6:10] == theirs[6:10] == get_random_rc
    assert len(mine) == len(theirs)


@pytest.mark.parametrize("tpm2", FAMILIES)
def test_existing_with_missing_permall_does_not_start(tpm2: bool, tmp_path: Path) -> None:
    """--existing: the server refuses to start at all, with the reason, and makes nothing."""
    state = tmp_path / "state"
    state.mkdir()
    with pytest.raises(ServerStartError, match="missing"):
        stop_vtpm(launch_vtpm(state, tpm2=tpm2, extra_args=["--existing"]))
    assert not permall(state, tpm2).exists()


@pytest.mark.parametrize("tpm2", FAMILIES)
def test_existing_with_missing_permall_and_not_need_init_does_not_start(
    tpm2: bool, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    with pytest.raises(ServerStartError, match="missing"):
        stop_vtpm(launch_vtpm(state, tpm2=tpm2, flags="not-need-init", extra_args=["--existing"]))
    assert not permall(state, tpm2).exists()


CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    "zeroed-body": lambda good: good[:10] + bytes(len(good) - 10),
    "truncated": lambda good: good[: len(good) // 2],
    "empty": lambda good: b"",
    "flipped-byte": lambda good: good[:100] + bytes([good[100] ^ 0xFF]) + good[101:],
}


# Every corruption on TPM 2; TPM 1.2 (whose INIT runs an RSA self test) checks one.
CORRUPT_CASES = [
    pytest.param(
        tpm2,
        corruption,
        existing,
        id=f"{'tpm2' if tpm2 else 'tpm12'}-{corruption}{'-existing' if existing else ''}",
    )
    for tpm2, corruptions in ((True, list(CORRUPTIONS)), (False, ["zeroed-body"]))
    for corruption, existing in ((c, False) for c in corruptions)
]


@pytest.mark.parametrize(("tpm2", "corruption", "existing"), CORRUPT_CASES)
def test_corrupt_permall_fails_init_and_is_kept(
    tpm2: bool,
    corruption: str,
    existing: bool,
    tmp_path: Path,
    vtpm_server: Callable[..., Any],
    swtpm_server: Callable[..., Any],
    manufactured: Callable[[bool, Path], Path],
) -> None:
    """INIT fails as it does in swtpm; the file is left as it was (never re-manufactured)."""
    dirs = {who: manufactured(tpm2, tmp_path / who) for who in ("ours", "swtpm")}
    bad = CORRUPTIONS[corruption](permall(dirs["ours"], tpm2).read_bytes())
    for d in dirs.values():
        permall(d, tpm2).write_bytes(bad)
    ours = vtpm_server(dirs["ours"], tpm2=tpm2, extra_args=["--existing"] if existing else [])
    peer = swtpm_server(dirs["swtpm"], tpm2=tpm2)
    mine, theirs = ours.ioctl("-i", check=False), peer.ioctl("-i", check=False)
    assert (mine.returncode, mine.stderr) == (1, INIT_FAILED[tpm2])
    assert (mine.returncode, mine.stdout, mine.stderr) == (
        theirs.returncode,
        theirs.stdout,
        theirs.stderr,
    )
    assert ours.ioctl("-i", check=False).returncode == 1
    ours.terminate()
    assert permall(dirs["ours"], tpm2).read_bytes() == bad


@pytest.mark.parametrize("tpm2", FAMILIES)
def test_existing_with_corrupt_permall_does_not_start(
    tpm2: bool, tmp_path: Path, manufactured: Callable[[bool, Path], Path]
) -> None:
    """--existing: libtpms' ValidateState refuses the damaged state before anything runs."""
    state = manufactured(tpm2, tmp_path / "state")
    bad = CORRUPTIONS["zeroed-body"](permall(state, tpm2).read_bytes())
    permall(state, tpm2).write_bytes(bad)
    with pytest.raises(ServerStartError, match="corrupt"):
        stop_vtpm(launch_vtpm(state, tpm2=tpm2, extra_args=["--existing"]))
    assert permall(state, tpm2).read_bytes() == bad


def test_corrupt_header_is_refused(
    tmp_path: Path, vtpm_server: Callable[..., Any], manufactured: Callable[[bool, Path], Path]
) -> None:
    """A header version we do not know fails INIT (swtpm 0.7.1 reads it as version 2)."""
    state = manufactured(True, tmp_path / "state")
    bad = b"\x07" + permall(state).read_bytes()[1:]
    permall(state).write_bytes(bad)
    server = vtpm_server(state)
    res = server.ioctl("-i", check=False)
    assert (res.returncode, res.stderr) == (1, INIT_FAILED[True])
    server.terminate()
    assert permall(state).read_bytes() == bad


def test_volatile_state_without_permall_is_not_a_new_tpm(
    tmp_path: Path, vtpm_server: Callable[..., Any]
) -> None:
    """A dir with a volatile state but no permall had a TPM: INIT fails, nothing is made."""
    state = tmp_path / "state"
    first = vtpm_server(state, flags="not-need-init,startup-clear")
    first.ioctl("-v")
    assert first.shutdown() == 0
    permall(state).unlink()
    server = vtpm_server(state)
    res = server.ioctl("-i", check=False)
    assert (res.returncode, res.stderr) == (1, INIT_FAILED[True])
    assert not permall(state).exists()
    assert (state / "tpm2-00.volatilestate").exists()


def test_permall_removed_before_init_is_not_a_new_tpm(
    tmp_path: Path, vtpm_server: Callable[..., Any], manufactured: Callable[[bool, Path], Path]
) -> None:
    """The dir had a permall when the server started; it is gone by CMD_INIT."""
    state = manufactured(True, tmp_path / "state")
    server = vtpm_server(state)
    permall(state).unlink()
    res = server.ioctl("-i", check=False)
    assert (res.returncode, res.stderr) == (1, INIT_FAILED[True])
    assert not permall(state).exists()


def test_empty_dir_gets_a_new_tpm(tmp_path: Path, vtpm_server: Callable[..., Any]) -> None:
    state = tmp_path / "state"
    server = vtpm_server(state)
    server.ioctl("-i")
    assert tpm_command(server, TPM2_STARTUP_CLEAR)[6:10] == bytes(4)
    assert permall(state).exists()
