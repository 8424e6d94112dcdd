"""Control semantics of the engine, on the real libtpms in this process.

The engine takes its libtpms binding as a parameter, so one binding serves
every engine of this module in turn (libtpms keeps one TPM per process):
each test gets a fresh state dir and an engine that is closed afterwards.
What is checked here is what the engine decides itself (the running-state
rule of the protocol table, the power transitions, locality and the
establishment bit); the byte-for-byte parity with swtpm is tested in
tests/interop.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from vtpmctl.device.protocol import MESSAGES, BlobType, Cmd, InitFlag, Res, tpm_code
from vtpmctl.engine import tpm2
from vtpmctl.engine.libtpms import Libtpms
from vtpmctl.engine.tpm import Engine, EngineConfig
from vtpmctl.model import OnShutdown
from vtpmctl.store.statedir import StateDir

# A request each command accepts, so only the state decides the result.
REQUESTS: dict[Cmd, dict[str, int]] = {
    Cmd.GET_CAPABILITY: {},
    Cmd.INIT: {"init_flags": 0},
    Cmd.SHUTDOWN: {},
    Cmd.GET_TPMESTABLISHED: {},
    Cmd.SET_LOCALITY: {"loc": 0},
    Cmd.HASH_START: {},
    Cmd.HASH_DATA: {"length": 0},
    Cmd.HASH_END: {},
    Cmd.CANCEL_TPM_CMD: {},
    Cmd.STORE_VOLATILE: {},
    Cmd.RESET_TPMESTABLISHED: {"loc": 3},
    Cmd.GET_STATEBLOB: {"state_flags": 0, "type": BlobType.PERMANENT, "offset": 0},
    Cmd.SET_STATEBLOB: {"state_flags": 0, "type": BlobType.VOLATILE, "length": 0},
    Cmd.STOP: {},
    Cmd.GET_CONFIG: {},
    Cmd.SET_BUFFERSIZE: {"buffersize": 0},
    Cmd.GET_INFO: {"flags": 1, "offset": 0},
    Cmd.LOCK_STORAGE: {"retries": 0},
}
# swtpm's rule (docs/protocol.md#control-commands), written out here so that the table is
# checked too.
NEEDS_RUNNING = {
    Cmd.GET_TPMESTABLISHED,
    Cmd.HASH_START,
    Cmd.HASH_DATA,
    Cmd.HASH_END,
    Cmd.CANCEL_TPM_CMD,
    Cmd.STORE_VOLATILE,
    Cmd.RESET_TPMESTABLISHED,
    Cmd.GET_STATEBLOB,
}
NEEDS_STOPPED = {Cmd.SET_STATEBLOB}
GETRANDOM = tpm2.build_get_random(16)


@pytest.fixture(scope="module")
def binding() -> Libtpms:
    """The process's one libtpms binding, made by the first test that needs it."""
    return Libtpms._instance or Libtpms()


def make_engine(binding: Libtpms, path: Path, **config: object) -> Engine:
    statedir = StateDir(path, tpm2=True, key=None)
    statedir.ensure()
    engine = Engine(statedir, EngineConfig(tpm2=True, **config), tpm=binding)  # type: ignore[arg-type]
    engine.start()
    return engine


@pytest.fixture
def engine(binding: Libtpms, tmp_path: Path) -> Iterator[Engine]:
    made = make_engine(binding, tmp_path / "state")
    try:
        yield made
    finally:
        made.close()


def ok(engine: Engine, cmd: Cmd, req: dict[str, int] | None = None, data: bytes = b"") -> None:
    reply = engine.control(cmd, REQUESTS[cmd] if req is None else req, data)
    assert reply.result == Res.SUCCESS, (cmd.name, hex(reply.result))


def started(engine: Engine) -> Engine:
    ok(engine, Cmd.INIT)
    assert tpm_code(engine.process(tpm2.build_startup(tpm2.SU_CLEAR))) == tpm2.RC.SUCCESS
    return engine


# ---------------------------------------------------------------- the table's rule


def test_the_table_declares_swtpms_running_state_rule() -> None:
    assert {c for c, m in MESSAGES.items() if m.needs_running is True} == NEEDS_RUNNING
    assert {c for c, m in MESSAGES.items() if m.needs_running is False} == NEEDS_STOPPED
    assert {c for c, m in MESSAGES.items() if m.stopped_to_set} == {Cmd.SET_BUFFERSIZE}
    assert {c for c, m in MESSAGES.items() if m.while_busy} == {
        Cmd.GET_CAPABILITY,
        Cmd.CANCEL_TPM_CMD,
    }


@pytest.mark.parametrize("running", [False, True], ids=["stopped", "running"])
def test_running_state_rule_per_command(engine: Engine, running: bool) -> None:
    for cmd in REQUESTS:
        if running:
            ok(engine, Cmd.INIT)
        else:
            ok(engine, Cmd.STOP)
        assert engine.running is running
        result = engine.control(cmd, REQUESTS[cmd]).result
        refused = cmd in (NEEDS_STOPPED if running else NEEDS_RUNNING)
        if refused:
            assert result == Res.BAD_ORDINAL, cmd.name
        else:
            assert result == Res.SUCCESS, (cmd.name, hex(result))


def test_set_buffersize_queries_in_any_state_and_sets_only_when_stopped(engine: Engine) -> None:
    ok(engine, Cmd.INIT)
    query = engine.control(Cmd.SET_BUFFERSIZE, {"buffersize": 0})
    assert query.result == Res.SUCCESS and query.fields["buffersize"] > 0
    assert engine.control(Cmd.SET_BUFFERSIZE, {"buffersize": 4096}).result == Res.BAD_ORDINAL
    ok(engine, Cmd.STOP)
    ok(engine, Cmd.SET_BUFFERSIZE, {"buffersize": 4096})


def test_the_engine_has_no_set_datafd(engine: Engine) -> None:
    """SET_DATAFD is the socket server's; the engine refuses it in every state."""
    assert engine.control(Cmd.SET_DATAFD, {}).result == Res.BAD_ORDINAL
    ok(engine, Cmd.INIT)
    assert engine.control(Cmd.SET_DATAFD, {}).result == Res.BAD_ORDINAL


def test_while_busy_commands_do_not_wait_for_the_engine_lock(engine: Engine) -> None:
    started(engine)
    with engine.lock:  # a TPM command holds it; these must answer anyway
        caps = engine.control(Cmd.GET_CAPABILITY, {})
        assert caps.result == Res.SUCCESS and caps.fields["caps"] == engine.capabilities()
        assert engine.control(Cmd.CANCEL_TPM_CMD, {}).result == Res.SUCCESS
    ok(engine, Cmd.STOP)
    assert engine.control(Cmd.CANCEL_TPM_CMD, {}).result == Res.BAD_ORDINAL


# ---------------------------------------------------------------- power transitions


def test_init_stop_init_shutdown(engine: Engine) -> None:
    assert not engine.running and not engine.ready
    assert engine.process(GETRANDOM) == engine.fatal_response
    started(engine)
    assert engine.running and engine.ready
    assert tpm_code(engine.process(GETRANDOM)) == tpm2.RC.SUCCESS
    ok(engine, Cmd.STOP)
    assert not engine.running and not engine.ready
    assert engine.process(GETRANDOM) == engine.fatal_response
    started(engine)  # INIT after STOP starts the same TPM again
    assert tpm_code(engine.process(GETRANDOM)) == tpm2.RC.SUCCESS
    reply = engine.control(Cmd.SHUTDOWN, {})
    assert reply.result == Res.SUCCESS and reply.exit_after
    assert engine.shutdown_requested.is_set() and not engine.running
    assert engine.process(GETRANDOM) == engine.fatal_response


def test_power_off_shutdown_keeps_serving_and_resumes_after_su_state(
    binding: Libtpms, tmp_path: Path
) -> None:
    """--on-shutdown power-off: CMD_SHUTDOWN saves and powers off; the next INIT powers on,
    and TPM2_Startup(SU_STATE) resumes what the last run left (its auto-shutdown)."""
    engine = make_engine(binding, tmp_path / "state", on_shutdown=OnShutdown.POWER_OFF)
    try:
        started(engine)
        # TPM2_PCR_Extend(PCR 0, SHA-256 digest) with an empty password session
        body = (
            bytes.fromhex("0000000000000009400000090000000000")
            + bytes.fromhex("00000001000b")
            + bytes(range(32))
        )
        extend = bytes.fromhex("8002") + (10 + len(body)).to_bytes(4, "big")
        extend += bytes.fromhex("00000182") + body
        assert tpm_code(engine.process(extend)) == tpm2.RC.SUCCESS
        before = tpm2.pcr_read(engine.process, {tpm2.Alg.SHA256: [0]})
        # A savestate GET (TPM 1.2 has one) releases the storage lock; SHUTDOWN takes it back.
        engine._release_after_savestate()
        assert not engine.statedir.locked
        reply = engine.control(Cmd.SHUTDOWN, {})
        assert reply.result == Res.SUCCESS and not reply.exit_after
        assert not engine.shutdown_requested.is_set() and not engine.running
        assert engine.statedir.locked
        assert engine.process(GETRANDOM) == engine.fatal_response
        ok(engine, Cmd.INIT)  # the next VM run
        resumed = engine.process(tpm2.build_startup(tpm2.SU_STATE))
        assert tpm_code(resumed) == tpm2.RC.SUCCESS
        assert tpm2.pcr_read(engine.process, {tpm2.Alg.SHA256: [0]}) == before
    finally:
        engine.close()


def test_init_while_running_restarts_the_tpm(engine: Engine) -> None:
    started(engine)
    ok(engine, Cmd.INIT)
    # A new power cycle: the TPM wants TPM2_Startup again.
    assert tpm_code(engine.process(GETRANDOM)) == tpm2.RC.INITIALIZE


def test_stop_and_shutdown_before_init_succeed(binding: Libtpms, tmp_path: Path) -> None:
    engine = make_engine(binding, tmp_path / "state")
    try:
        ok(engine, Cmd.STOP)
        assert engine.control(Cmd.SHUTDOWN, {}).exit_after
        assert not engine.running
    finally:
        engine.close()


def test_init_delete_volatile_removes_the_volatile_state(engine: Engine) -> None:
    started(engine)
    ok(engine, Cmd.STORE_VOLATILE)
    assert engine.statedir.exists("volatilestate")
    ok(engine, Cmd.INIT, {"init_flags": InitFlag.DELETE_VOLATILE})
    assert not engine.statedir.exists("volatilestate")


def test_not_need_init_and_startup_flags_start_the_tpm(binding: Libtpms, tmp_path: Path) -> None:
    engine = make_engine(binding, tmp_path / "state", not_need_init=True, startup="clear")
    try:
        assert engine.running and engine.ready
        assert tpm_code(engine.process(GETRANDOM)) == tpm2.RC.SUCCESS
    finally:
        engine.close()


def test_tpm2_shutdown_takes_the_slow_path_once(engine: Engine) -> None:
    started(engine)
    resp = engine.process(tpm2.build_shutdown(tpm2.SU_STATE))
    assert tpm_code(resp) == tpm2.RC.SUCCESS
    assert not engine.ready  # the next command clears the mark
    engine.process(GETRANDOM)
    assert engine.ready


def test_state_blobs_follow_the_running_state(engine: Engine) -> None:
    get = REQUESTS[Cmd.GET_STATEBLOB]
    assert engine.control(Cmd.GET_STATEBLOB, get).result == Res.BAD_ORDINAL
    started(engine)
    blob = engine.control(Cmd.GET_STATEBLOB, get)
    assert blob.result == Res.SUCCESS and blob.data
    assert (
        engine.control(Cmd.SET_STATEBLOB, REQUESTS[Cmd.SET_STATEBLOB], b"").result
        == Res.BAD_ORDINAL
    )
    ok(engine, Cmd.STOP)
    req = {"state_flags": 0, "type": BlobType.PERMANENT, "length": len(blob.data)}
    ok(engine, Cmd.SET_STATEBLOB, req, blob.data)
    started(engine)


# ---------------------------------------------------------------- locality


def test_set_locality(engine: Engine) -> None:
    for loc in range(5):
        ok(engine, Cmd.SET_LOCALITY, {"loc": loc})
        assert engine.locality() == loc
        # libtpms asks Python for the locality only while it is not 0.
        assert engine.tpm._locality_cb is (loc != 0)
    assert engine.control(Cmd.SET_LOCALITY, {"loc": 5}).result == Res.BAD_LOCALITY
    assert engine.locality() == 4  # a refused locality changes nothing


def test_locality_4_can_be_refused(binding: Libtpms, tmp_path: Path) -> None:
    engine = make_engine(binding, tmp_path / "state", reject_locality_4=True)
    try:
        assert engine.control(Cmd.SET_LOCALITY, {"loc": 4}).result == Res.BAD_LOCALITY
        ok(engine, Cmd.SET_LOCALITY, {"loc": 3})
    finally:
        engine.close()


def test_commands_run_at_the_locality_set(engine: Engine) -> None:
    ok(engine, Cmd.INIT)
    ok(engine, Cmd.SET_LOCALITY, {"loc": 1})
    # TPM2_Startup is refused at locality 1 (TPM_RC_LOCALITY).
    assert tpm_code(engine.process(tpm2.build_startup(tpm2.SU_CLEAR))) == 0x907
    ok(engine, Cmd.SET_LOCALITY, {"loc": 0})
    assert tpm_code(engine.process(tpm2.build_startup(tpm2.SU_CLEAR))) == tpm2.RC.SUCCESS


# ---------------------------------------------------------------- establishment


def established(engine: Engine) -> int:
    reply = engine.control(Cmd.GET_TPMESTABLISHED, {})
    assert reply.result == Res.SUCCESS
    return reply.fields["bit"]


def test_establishment_bit(engine: Engine) -> None:
    started(engine)
    ok(engine, Cmd.HASH_START)
    ok(engine, Cmd.HASH_DATA, {"length": 3}, b"abc")
    ok(engine, Cmd.HASH_END)
    assert established(engine) == 1
    ok(engine, Cmd.SET_LOCALITY, {"loc": 2})
    # Only locality 3 or 4 may reset it; the engine's own locality is kept.
    assert engine.control(Cmd.RESET_TPMESTABLISHED, {"loc": 0}).result == Res.BAD_LOCALITY
    assert engine.control(Cmd.RESET_TPMESTABLISHED, {"loc": 5}).result == Res.BAD_LOCALITY
    assert established(engine) == 1
    ok(engine, Cmd.RESET_TPMESTABLISHED, {"loc": 3})
    assert established(engine) == 0
    assert engine.locality() == 2


def test_control_is_serialised_with_tpm_commands(engine: Engine) -> None:
    """Control commands from another thread wait for the engine lock."""
    started(engine)
    done = threading.Event()

    def other() -> None:
        engine.control(Cmd.GET_TPMESTABLISHED, {})
        done.set()

    with engine.lock:
        thread = threading.Thread(target=other)
        thread.start()
        assert not done.wait(0.2)
    thread.join(10)
    assert done.is_set()
