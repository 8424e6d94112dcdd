"""Log records without the stdlib ``logging`` package on the vTPM daemon's path.

Every module the zygote imports is in the resident memory of every daemon
forked from it (docs/architecture.md, "The zygote"), and ``logging`` brings
``traceback``, ``textwrap`` and ``string`` (and ``linecache``, ``tokenize``,
``weakref``) with it: about 0.3 MiB of each daemon's RSS on top of what the
zygote imports anyway, for a handful of lines a day. So the modules a daemon
runs log through :func:`get` instead, in two modes:

- by default each record goes to ``logging.getLogger(name)``, imported at the
  first record, so every process that sets up ``logging`` itself (the CLI,
  ``swtpm``, the manufacture child) sees exactly the records it saw before;
- a daemon calls :func:`write_to` once: records at INFO and above are then
  written here, byte for byte as its stdlib handler wrote them (``FORMAT``),
  one write per record, and :func:`take_stdlib_records` sends what stdlib
  ``logging`` gets (boto3's records, when the daemon replicates) to the same
  log.
"""

from __future__ import annotations

import io
import sys
import threading
import time
from collections.abc import Mapping

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import FrameType, TracebackType
    from typing import TextIO, TypeAlias

    ExcInfo: TypeAlias = (
        tuple[type[BaseException], BaseException, TracebackType] | tuple[None, None, None]
    )

DEBUG = 10
INFO = 20
WARNING = 30
ERROR = 40
_LEVEL_NAMES = {DEBUG: "DEBUG", INFO: "INFO", WARNING: "WARNING", ERROR: "ERROR"}

# The stdlib format the daemon's log has always had; format_line writes it.
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Logger:
    """A named source of records with the ``logging.Logger`` methods vtpmctl uses."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def debug(self, msg: object, *args: object) -> None:
        _emit(self.name, DEBUG, msg, args, False)

    def info(self, msg: object, *args: object) -> None:
        _emit(self.name, INFO, msg, args, False)

    def warning(self, msg: object, *args: object) -> None:
        _emit(self.name, WARNING, msg, args, False)

    def error(self, msg: object, *args: object) -> None:
        _emit(self.name, ERROR, msg, args, False)

    def exception(self, msg: object, *args: object) -> None:
        """An ERROR record followed by the traceback of the exception being handled."""
        _emit(self.name, ERROR, msg, args, True)


def get(name: str) -> Logger:
    """The logger called ``name`` (the stdlib logger's name when records are forwarded)."""
    return Logger(name)


class _Sink:
    """The daemon's log stream, shared by its threads: one record, one write."""

    __slots__ = ("stream", "lock")

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        # Reentrant, as logging.Handler's lock: a signal handler that logs may
        # interrupt the main thread in the middle of a write.
        self.lock = threading.RLock()

    def write(self, line: str) -> None:
        with self.lock:
            self.stream.write(line + "\n")
            self.stream.flush()


_sink: _Sink | None = None  # None: records go to stdlib logging


def write_to(stream: TextIO | None) -> None:
    """Write records at INFO and above to ``stream`` from now on (None: forward them again).

    ``stream`` should be line-buffered, as ``os.fdopen(fd, "a", buffering=1)``
    or ``sys.stderr`` are, so that a record leaves in one write.
    """
    global _sink
    _sink = None if stream is None else _Sink(stream)


def take_stdlib_records() -> None:
    """Send stdlib ``logging``'s records at INFO and above to the stream of :func:`write_to`.

    For a daemon that imports a library that logs through ``logging`` (boto3):
    its records reach the daemon's log as they did when the daemon's root
    handler was a ``logging.StreamHandler``. Imports ``logging``; without a
    stream it does nothing.
    """
    if _sink is None:
        return
    sink: _Sink = _sink
    import logging

    class ToSink(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                sink.write(self.format(record))
            except Exception:
                self.handleError(record)

    handler = ToSink()
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def format_line(
    name: str,
    level: int,
    msg: object,
    args: tuple[object, ...],
    exc_info: ExcInfo | None,
    created: float,
) -> str:
    """``logging.Formatter(FORMAT)``'s text for such a record, created at ``created``."""
    message = str(msg)
    if args:
        values: object = args
        if len(args) == 1 and isinstance(args[0], Mapping) and args[0]:
            values = args[0]  # "%(key)s" formats, as logging.LogRecord allows
        message = message % values
    msecs = int((created - int(created)) * 1000)
    asctime = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created))
    line = f"{asctime},{msecs:03d} {_LEVEL_NAMES[level]} {name}: {message}"
    if exc_info is not None:
        text = _format_exception(exc_info)
        if text:
            if line[-1:] != "\n":
                line += "\n"
            line += text
    return line


def _format_exception(exc_info: ExcInfo) -> str:
    """``logging.Formatter.formatException``: the traceback, without its last newline."""
    import traceback  # only once a record carries a traceback

    out = io.StringIO()
    traceback.print_exception(exc_info[0], exc_info[1], exc_info[2], None, out)
    text = out.getvalue()
    return text[:-1] if text[-1:] == "\n" else text


def _emit(name: str, level: int, msg: object, args: tuple[object, ...], exc: bool) -> None:
    sink = _sink
    if sink is None:
        import logging

        # stacklevel: the record names the caller of Logger.info (not this file),
        # as when the caller held a logging.Logger.
        logging.getLogger(name).log(level, msg, *args, exc_info=exc or None, stacklevel=3)
        return
    if level < INFO:
        return
    created = time.time()
    try:
        sink.write(format_line(name, level, msg, args, sys.exc_info() if exc else None, created))
    except Exception:  # a log that cannot be written must not stop the daemon
        _report(msg, args, sys._getframe(2))


def _report(msg: object, args: tuple[object, ...], caller: FrameType) -> None:
    """On stderr, what ``logging.Handler.handleError`` says about a record it could not write."""
    try:
        import traceback

        sys.stderr.write("--- Logging error ---\n")
        traceback.print_exc(file=sys.stderr)
        sys.stderr.write("Call stack:\n")
        traceback.print_stack(caller, file=sys.stderr)
        try:
            sys.stderr.write(f"Message: {msg!r}\nArguments: {args}\n")
        except Exception:
            sys.stderr.write(
                "Unable to print the message and arguments - possible formatting error.\n"
                "Use the traceback above to help find the error.\n"
            )
    except Exception:
        pass
