"""A control request whose client gave up is never carried out.

While another client (QEMU) holds the control channel, ``vtpmctl ctl`` waits, times
out and exits 1; its request sits unread on the server's side. When the holder leaves,
the server must drop that request, not stop or shut down the TPM seconds after the
command line reported failure; and the command line says what really happened.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rawsock import connect, exchange, h

VTPMCTL = [str(Path(sys.executable).with_name("vtpmctl"))]
GET_CAPABILITY = h("00 00 00 01")
GET_TPMESTABLISHED = h("00 00 00 04")


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VTPMCTL, "--timeout", "1", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=dict(os.environ),
    )


@pytest.mark.parametrize("ctrl", ["unix", "tcp"])
@pytest.mark.parametrize("action", ["shutdown", "stop"])
def test_request_of_a_client_that_gave_up_is_dropped(
    ctrl: str, action: str, vtpm_server: Callable[..., Any]
) -> None:
    server = vtpm_server(ctrl=ctrl, flags="not-need-init,startup-clear")
    target = f"unix:{server.ctrl.path}" if ctrl == "unix" else f"tcp:127.0.0.1:{server.ctrl.port}"
    with connect(server.ctrl) as holder:
        assert exchange(holder, GET_CAPABILITY).data[:4] == bytes(4)  # the holder is served
        result = ctl("ctl", target, action)
        assert result.returncode == 1
        message = result.stderr.strip()
        assert "\n" not in message and "Traceback" not in message
        assert f"CMD_{action.upper()}" in message
        assert "another client" in message and "not carried out" in message
    time.sleep(0.5)  # the holder is gone: the server looks at the queued request
    assert server.proc.poll() is None, "the dropped CMD_SHUTDOWN was executed"
    with connect(server.ctrl) as probe:
        reply = exchange(probe, GET_TPMESTABLISHED)
    assert reply.data[:4] == bytes(4), "the dropped CMD_STOP was executed"
    assert "dropped" in server.log_text()


def test_request_read_but_not_answered_says_so(tmp_path: Path) -> None:
    """A peer that read the request and stays silent may be acting on it: say so."""
    import socket

    path = tmp_path / "silent.ctrl"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    proc = subprocess.Popen(
        [*VTPMCTL, "--timeout", "1", "ctl", f"unix:{path}", "init"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    conn, _ = listener.accept()
    try:
        assert conn.recv(64)  # the request is read, never answered
        _, err = proc.communicate(timeout=30)
    finally:
        conn.close()
        listener.close()
    assert proc.returncode == 1
    assert "CMD_INIT" in err and "may still be carrying it out" in err
