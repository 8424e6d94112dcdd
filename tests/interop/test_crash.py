"""kill -9 of instance daemons in the middle of NV writes.

Each round starts the instance the way ``vtpmctl start`` does (with --existing, so a
lost or torn permall would be an error, never a new TPM), boots it, checks that the NV
index holds the last value whose write was acknowledged or the one in flight, then
writes as fast as it can until SIGKILL lands at a random moment. Rounds are spread over
a few instances in parallel so that 200 of them fit the time budget; commands go over a
raw data socket (no TSS start-up cost per round).
"""

from __future__ import annotations

import os
import random
import signal
import threading
from pathlib import Path

from instance_helpers import DataClient, home_at, nv_define, nv_read, nv_write_cmd, rc

from vtpmctl.device.client.control import ControlClient, SocketTransport
from vtpmctl.engine import tpm2 as t
from vtpmctl.store.instances import Instance
from vtpmctl.usecases import supervisor

ROUNDS = 200
WORKERS = 4
TPM2_STARTUP_CLEAR = t.build_startup(t.SU_CLEAR)


def _rounds(inst: Instance, rounds: int, seed: int, log: list[str]) -> None:
    rng = random.Random(seed)
    acked: bytes | None = None
    in_flight: bytes | None = None
    counter = 0
    for n in range(rounds):
        started = supervisor.start(inst)
        assert not started.already
        with ControlClient(SocketTransport(str(inst.paths.ctrl_socket))) as ctrl:
            ctrl.init()
        with DataClient(inst.paths.data_socket) as tpm:
            assert rc(tpm.transact(TPM2_STARTUP_CLEAR)) == 0, f"round {n}: Startup failed"
            if n == 0:
                nv_define(tpm.transact)
                acked = counter.to_bytes(8, "big")
                assert rc(tpm.transact(nv_write_cmd(acked))) == 0
            else:
                value = nv_read(tpm.transact)
                assert value in (acked, in_flight), (
                    f"round {n}: NV holds {value.hex()}, acknowledged {acked and acked.hex()}, "
                    f"in flight {in_flight and in_flight.hex()}"
                )
                log.append("acked" if value == acked else "in-flight")
                acked, in_flight = value, None  # what the TPM holds now
            killer = threading.Timer(
                rng.uniform(0.002, 0.06), os.kill, (started.pid, signal.SIGKILL)
            )
            killer.start()
            try:
                while True:
                    counter += 1
                    in_flight = counter.to_bytes(8, "big")
                    resp = tpm.transact(nv_write_cmd(in_flight))
                    assert rc(resp) == 0, f"round {n}: NV_Write rc {rc(resp):#x}"
                    acked = in_flight
            except (ConnectionError, OSError):
                pass
            finally:
                killer.join()
        assert supervisor.wait_stopped(inst, started.pid, 10), f"{started.pid} survived"


def test_kill9_during_nv_writes(tmp_path: Path) -> None:
    with home_at(tmp_path / "h") as home:
        names = [f"crash{i}" for i in range(WORKERS)]
        for name in names:
            home.run("create", name, "--no-ek")
        registry = home.registry()
        errors: list[BaseException] = []
        logs: list[list[str]] = [[] for _ in names]

        def work(i: int) -> None:
            try:
                _rounds(registry.get(names[i]), ROUNDS // WORKERS, seed=i, log=logs[i])
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(WORKERS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise errors[0]
        outcomes = [o for log in logs for o in log]
        assert len(outcomes) == ROUNDS - WORKERS  # every restart opened and was checked
        for name in names:  # and the state still opens with the ordinary CLI
            home.run("start", name)
            assert home.status(name)[0] == 0
