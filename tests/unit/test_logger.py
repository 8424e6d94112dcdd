"""vtpmctl.logger: the daemon's log lines are the ones its stdlib handler wrote, and
every other process still gets its records through stdlib ``logging``."""

from __future__ import annotations

import io
import logging
import sys
import threading
import time
import types
from collections.abc import Iterator

import pytest

from vtpmctl import logger

CREATED = 1_767_225_600.0421  # a fixed record time, so both sides stamp the same


@pytest.fixture(autouse=True)
def _restore() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    logger.write_to(None)
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = types.SimpleNamespace(
        time=lambda: CREATED, localtime=time.localtime, strftime=time.strftime
    )
    monkeypatch.setattr(logger, "time", clock)


def stdlib_line(name: str, level: int, msg: str, args: tuple[object, ...], exc: bool) -> str:
    """What the daemon's former root handler wrote for this record."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter(logger.FORMAT))
    record = logging.LogRecord(name, level, __file__, 1, msg, args, sys.exc_info() if exc else None)
    record.created = CREATED
    record.msecs = int((CREATED - int(CREATED)) * 1000) + 0.0
    handler.handle(record)
    return out.getvalue()


@pytest.mark.usefixtures("fixed_clock")
def test_direct_lines_are_the_stdlib_formatters() -> None:
    out = io.StringIO()
    logger.write_to(out)
    log = logger.get("vtpmctl.daemon")
    expected = []

    log.info("serving %s (TPM %s) on %s", "/tmp/st", "2.0", "unix:/tmp/ctrl")
    expected.append(
        stdlib_line(
            "vtpmctl.daemon",
            logging.INFO,
            "serving %s (TPM %s) on %s",
            ("/tmp/st", "2.0", "unix:/tmp/ctrl"),
            False,
        )
    )
    log.info("stopped")
    expected.append(stdlib_line("vtpmctl.daemon", logging.INFO, "stopped", (), False))
    log.warning("100% of %s")  # no args: the % is not a format
    expected.append(stdlib_line("vtpmctl.daemon", logging.WARNING, "100% of %s", (), False))
    log.error("%(what)s failed", {"what": "CMD_INIT"})
    expected.append(
        stdlib_line(
            "vtpmctl.daemon", logging.ERROR, "%(what)s failed", ({"what": "CMD_INIT"},), False
        )
    )
    try:
        {}["missing"]
    except KeyError:
        log.exception("control command %s failed", "INIT")
        expected.append(
            stdlib_line(
                "vtpmctl.daemon", logging.ERROR, "control command %s failed", ("INIT",), True
            )
        )
    log.exception("no exception being handled")
    expected.append(
        stdlib_line("vtpmctl.daemon", logging.ERROR, "no exception being handled", (), True)
    )

    assert out.getvalue() == "".join(expected)
    assert "Traceback (most recent call last):" in expected[4]
    assert expected[4].endswith("KeyError: 'missing'\n")


def test_direct_mode_drops_records_below_info() -> None:
    out = io.StringIO()
    logger.write_to(out)
    log = logger.get("vtpmctl.engine.tpm")
    log.debug("not written %s", 1)
    assert out.getvalue() == ""
    log.info("written")
    assert out.getvalue().endswith(" INFO vtpmctl.engine.tpm: written\n")


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_forwarded_records_reach_stdlib_with_name_level_and_caller() -> None:
    target = logging.getLogger("vtpmctl.test.forward")
    collect = Collect()
    target.addHandler(collect)
    target.setLevel(logging.DEBUG)
    try:
        log = logger.get("vtpmctl.test.forward")
        log.debug("debug %d", 1)
        log.warning("warning")
        try:
            raise ValueError("bad")
        except ValueError:
            log.exception("failed %s", "here")
    finally:
        target.removeHandler(collect)
        target.setLevel(logging.NOTSET)

    got = [(r.name, r.levelno, r.getMessage()) for r in collect.records]
    assert got == [
        ("vtpmctl.test.forward", logging.DEBUG, "debug 1"),
        ("vtpmctl.test.forward", logging.WARNING, "warning"),
        ("vtpmctl.test.forward", logging.ERROR, "failed here"),
    ]
    assert collect.records[2].exc_info is not None
    assert isinstance(collect.records[2].exc_info[1], ValueError)
    # The record names the line that logged, not vtpmctl/logger.py.
    assert {r.pathname for r in collect.records} == {__file__}
    assert {r.funcName for r in collect.records} == {
        "test_forwarded_records_reach_stdlib_with_name_level_and_caller"
    }


@pytest.mark.usefixtures("fixed_clock")
def test_stdlib_records_go_to_the_same_stream() -> None:
    out = io.StringIO()
    logger.write_to(out)
    logger.take_stdlib_records()
    logging.getLogger("botocore.credentials").info("Found credentials in %s", "env")
    logging.getLogger("botocore.hooks").debug("not written")
    written = out.getvalue()
    assert written.endswith(" INFO botocore.credentials: Found credentials in env\n")
    assert written.count("\n") == 1


def test_a_failing_write_never_raises(capsys: pytest.CaptureFixture[str]) -> None:
    class Broken(io.StringIO):
        def write(self, s: str) -> int:
            raise OSError(28, "No space left on device")

    logger.write_to(Broken())
    logger.get("vtpmctl.daemon").info("lost %s", "line")
    err = capsys.readouterr().err
    assert err.startswith("--- Logging error ---\n")
    assert "OSError: [Errno 28] No space left on device" in err
    assert "Message: 'lost %s'\nArguments: ('line',)\n" in err

    out = io.StringIO()
    logger.write_to(out)
    logger.get("vtpmctl.daemon").info("%d", "not a number")  # a bug in a log call
    assert out.getvalue() == ""
    assert "TypeError" in capsys.readouterr().err


def test_threads_write_whole_records() -> None:
    class Writes(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[str] = []

        def write(self, s: str) -> int:
            self.calls.append(s)
            time.sleep(0)  # let another thread in, if the lock would
            return len(s)

    out = Writes()
    logger.write_to(out)

    def work(n: int) -> None:
        log = logger.get(f"vtpmctl.t{n}")
        for i in range(200):
            log.info("record %d of thread %d", i, n)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out.calls) == 800
    assert all(c.count("\n") == 1 and c.endswith("\n") for c in out.calls)
