"""start, stop and rm racing each other, or a foreign swtpm: clear words, nothing left over.

* ``start`` racing ``rm`` must not recreate anything of the removed instance (a
  ``tpmstate/.lock`` or a log left behind blocks ``create NAME``); it says there is no
  such instance.
* Two ``stop``s at once both succeed: the one whose connection breaks because the
  other's CMD_SHUTDOWN ended the daemon waits for the lock before it reports.
* ``rm`` of an instance whose state a foreign swtpm holds gives the advice ``stop``
  gives, not a ``vtpmctl stop`` that ``stop`` then refuses.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from instance_helpers import VTPMCTL, Home, home_at
from rawsock import connect, exchange, h
from swtpm_peer import Endpoint, swtpm_socket

from vtpmctl.errors import NoSuchInstance
from vtpmctl.store.instances import Registry
from vtpmctl.store.paths import store_roots
from vtpmctl.usecases import supervisor


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    with home_at(tmp_path / "h") as h:
        yield h


def leftovers(home: Home, name: str) -> list[str]:
    paths = home.registry().paths(name)
    found = [p for p in (paths.base, paths.run_dir, paths.log_file) if os.path.lexists(p)]
    return [str(p) for p in found]


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


# ---------------------------------------------------------------- item 7: start racing rm


@pytest.mark.parametrize("when", ["before-preflight", "before-launch"])
def test_start_racing_rm_creates_nothing(
    home: Home, when: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    home.run("create", "gone", "--no-ek")
    home.run("start", "gone")
    home.run("stop", "gone")  # a log exists now, as for any instance that ran
    monkeypatch.setenv("VTPMCTL_HOME", str(home.path))
    inst = Registry(store_roots({"VTPMCTL_HOME": str(home.path)})).get("gone")
    if when == "before-preflight":
        home.run("rm", "gone", "--yes")
    else:
        real = supervisor.preflight

        def preflight_then_rm(*args: object, **kwargs: object) -> object:
            result = real(*args, **kwargs)  # type: ignore[arg-type]
            home.run("rm", "gone", "--yes")  # lands between the checks and the launch
            return result

        monkeypatch.setattr(supervisor, "preflight", preflight_then_rm)
    with pytest.raises(NoSuchInstance, match="no instance named gone"):
        supervisor.start(inst, timeout=10)
    assert leftovers(home, "gone") == []
    home.run("create", "gone", "--no-ek")  # the name is free again


def test_start_of_a_removed_instance_says_so(home: Home) -> None:
    home.run("create", "x", "--no-ek")
    home.registry().paths("x").config_file.unlink()  # rm's first step, then a crash
    before = sorted(home.path.rglob("*"))
    message = one_line(home.run("start", "x", check=False))
    assert "no instance named x" in message
    assert sorted(home.path.rglob("*")) == before


# ---------------------------------------------------------------- item 22: two stops


def test_stop_whose_connection_breaks_because_another_stop_won(home: Home) -> None:
    """The other stop's CMD_SHUTDOWN ends the daemon while ours waits for the channel."""
    home.run("create", "twice", "--no-ek")
    home.run("start", "twice")
    ctrl = home.registry().paths("twice").ctrl_socket
    with connect(Endpoint("unix", path=ctrl)) as other:
        assert exchange(other, h("00 00 00 01")).data[:4] == bytes(4)  # holds the channel
        ours = subprocess.Popen(
            [*VTPMCTL, "stop", "twice"],
            env=home.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.5)  # ours has sent CMD_SHUTDOWN and waits behind the other client
        assert ours.poll() is None
        other.sendall(h("00 00 00 03"))  # the other stop's CMD_SHUTDOWN
        out, err = ours.communicate(timeout=60)
    assert ours.returncode == 0, err
    assert "stopped twice" in out
    assert home.status("twice")[0] == 3


def test_two_concurrent_stops_both_succeed(home: Home) -> None:
    home.run("create", "twice", "--no-ek")
    for _ in range(3):
        home.run("start", "twice")
        procs = [
            subprocess.Popen(
                [*VTPMCTL, "stop", "twice"],
                env=home.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        results = [(*p.communicate(timeout=60), p.returncode) for p in procs]
        assert [r[2] for r in results] == [0, 0], results
        assert home.status("twice")[0] == 3


# ---------------------------------------------------------------- item 24: rm vs a swtpm


def test_rm_of_a_state_held_by_swtpm_gives_stops_advice(home: Home) -> None:
    home.run("create", "held", "--no-ek")
    state_dir = home.registry().paths("held").state_dir
    with swtpm_socket(state_dir, tpm2=True) as peer:
        stop_says = one_line(home.run("stop", "held", check=False))
        rm_says = one_line(home.run("rm", "held", "--yes", check=False))
        assert "not its vtpmctl daemon" in rm_says and str(peer.proc.pid) in rm_says
        assert "vtpmctl stop" not in rm_says
        assert rm_says == stop_says
        assert peer.running
        peer.shutdown()
    home.run("rm", "held", "--yes")
