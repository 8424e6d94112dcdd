"""Engine.bind, the data channel's fast path: the same responses as
process_buffer, sent in place without blocking, the rest returned.

libtpms holds one TPM per process, so the checks run in a child process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from vtpmctl.engine.libtpms import CommandBuffer
    from vtpmctl.engine.tpm import Engine, EngineConfig
    from vtpmctl.store.statedir import StateDir

    GETRANDOM = bytes.fromhex("80010000000c0000017b0010")
    sd = StateDir(Path(sys.argv[1]), tpm2=True, key=None)
    sd.ensure()
    e = Engine(sd, EngineConfig(tpm2=True))
    buf = CommandBuffer()
    sent = []
    mode = {"take": None}

    def send(data, flags):
        assert flags == 0x40
        if mode["take"] == "block":
            raise BlockingIOError
        n = len(data) if mode["take"] is None else mode["take"]
        sent.append(bytes(data[:n]))
        return n

    run = e.bind(buf, send, 0x40)

    def command(cmd):
        buf.view[:len(cmd)] = cmd
        return run(len(cmd))

    # Before INIT: the fatal response, returned (slow path), nothing sent in place.
    assert command(GETRANDOM) == e.fatal_response and sent == []
    e.config.not_need_init = True
    e.config.startup = "clear"
    e.start()
    assert command(GETRANDOM) == b"" and len(sent) == 1
    resp = sent.pop()
    assert len(resp) == 28 and resp[:10] == bytes.fromhex("80010000001c00000000")
    mode["take"] = 5
    rest = command(GETRANDOM)
    assert len(sent.pop()) == 5 and len(rest) == 23
    mode["take"] = "block"
    rest = command(GETRANDOM)
    assert len(rest) == 28 and rest[:10] == bytes.fromhex("80010000001c00000000")
    mode["take"] = None
    # The response buffer freed under a live runner: libtpms allocates a new one.
    with e.lock:
        e.tpm.free_response_buffer()
    assert command(GETRANDOM) == b"" and sent.pop()[:10] == bytes.fromhex("80010000001c00000000")
    # TPM2_Shutdown goes through the slow path and is tracked; so does the
    # command after it, which clears the mark; then the fast path again.
    rest = command(bytes.fromhex("80010000000c000001450000"))
    assert rest[6:10] == b"\\0\\0\\0\\0" and e._last_was_shutdown
    assert command(GETRANDOM)[:10] == bytes.fromhex("80010000001c00000000") and sent == []
    assert not e._last_was_shutdown
    assert command(GETRANDOM) == b"" and len(sent.pop()) == 28
    e.close()
    print("ok")
""")


def test_bind_sends_in_place(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
