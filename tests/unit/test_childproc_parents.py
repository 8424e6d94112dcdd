"""What the zygote and the command server share (vtpmctl.childproc): the stale-code check,
the idle clock and reaping."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from vtpmctl import childproc


@pytest.mark.parametrize(
    "change",
    ["edited in place", "replaced (an upgrade's rename)", "removed", "touched"],
)
def test_any_change_to_a_stamped_file_is_stale(tmp_path: Path, change: str) -> None:
    files = [tmp_path / "a.py", tmp_path / "b.py"]
    for f in files:
        f.write_text("x = 1\n")
    stamps = childproc.source_stamps([str(f) for f in files])
    assert not childproc.stale(stamps)
    target = files[1]
    if change == "edited in place":
        target.write_text("x = 22\n")
    elif change == "replaced (an upgrade's rename)":
        new = tmp_path / "b.py.new"
        new.write_text("x = 1\n")  # same size, maybe the same mtime: a new inode
        os.replace(new, target)
    elif change == "removed":
        target.unlink()
    else:
        st = target.stat()
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert childproc.stale(stamps)


def test_the_package_sources_are_every_module_file() -> None:
    files = childproc.package_sources()
    root = Path(childproc.__file__).resolve().parent
    assert str(root / "cmdserver.py") in files
    assert str(root / "engine" / "libtpms.py") in files  # imported or not
    assert all(f.endswith(".py") for f in files)


def test_the_idle_clock_ends_only_an_idle_parent_with_nothing_running() -> None:
    clock = childproc.IdleClock(0.05)
    left = clock.remaining(busy=False)
    assert left is not None and 0 < left <= 0.05
    time.sleep(0.06)
    assert clock.remaining(busy=True) == 0.05  # children still run: wait another round
    time.sleep(0.06)
    assert clock.remaining(busy=False) is None
    clock.touch()
    assert clock.remaining(busy=False) is not None


REAP = """
import os, time
from vtpmctl import childproc
ended = os.fork()
if ended == 0:
    os._exit(3)
running = os.fork()
if running == 0:
    time.sleep(5)
    os._exit(0)
got = {}
deadline = time.monotonic() + 5
while ended not in got and time.monotonic() < deadline:
    got.update(childproc.reaped())
    time.sleep(0.01)
print(os.waitstatus_to_exitcode(got[ended]), running in got)
os.kill(running, 9)
"""


def test_reaped_collects_ended_children_without_waiting_for_running_ones() -> None:
    """In a process of its own: reaped() takes any child, which pytest's must keep."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", REAP], capture_output=True, text=True, timeout=30, check=True
    )
    assert done.stdout.split() == ["3", "False"]
