"""The zygote's client: which daemons it may fork (and which must be exec'd)."""

from __future__ import annotations

import os

from vtpmctl.childproc import (
    DAEMON_ENTRY,
    ZYGOTE_TITLE_ROOM,
    entry_argv,
    fits_title_room,
    fork_daemon,
)


def test_a_command_line_longer_than_the_zygotes_room_is_execd() -> None:
    """status and stop read a daemon's command line: a forked one must be able to show it."""
    base = entry_argv(DAEMON_ENTRY)
    used = sum(len(a) + 1 for a in base)
    assert fits_title_room([*base, "x" * (ZYGOTE_TITLE_ROOM - used - 1)])
    long_args = ["--state", "/" + "d" * (ZYGOTE_TITLE_ROOM - used)]
    assert not fits_title_room([*base, *long_args])
    r, w = os.pipe()
    try:
        # None before any zygote is asked: the caller execs the daemon instead.
        assert fork_daemon(long_args, {}, 2, w) is None
    finally:
        os.close(r)
        os.close(w)
