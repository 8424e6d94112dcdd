"""50 instances on one machine: they all start, and `list --json` stays fast.

The instances are clones of one manufactured TPM (a create each would only
measure manufacturing, which bench/bench_instances.py does); each has its own
state dir, sockets and daemon.
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from instance_helpers import home_at

from vtpmctl.store.instances import InstanceConfig, InstanceMeta
from vtpmctl.usecases import supervisor

COUNT = 50


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.mark.scale
def test_fifty_instances(tmp_path: Path) -> None:
    with home_at(tmp_path / "h") as home:
        home.run("create", "vm00", "--no-ek")
        registry = home.registry()
        template = registry.get("vm00")
        names = [f"vm{i:02d}" for i in range(COUNT)]
        for name in names[1:]:
            with registry.reserve(name) as paths:
                shutil.copytree(template.paths.state_dir, paths.state_dir)
                registry.commit(
                    paths,
                    InstanceConfig(name=name, ek=False),
                    InstanceMeta(libtpms_version=template.meta.libtpms_version),
                )
        instances = [registry.get(n) for n in names]

        t0 = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            started = list(pool.map(supervisor.start, instances))
        start_all = time.monotonic() - t0
        assert len({s.pid for s in started}) == COUNT

        # Best of three, and the CPU it used: the wall clock alone would measure
        # whatever else this machine is running.
        walls, cpus = [], []
        for _ in range(3):
            before = os.times()
            t0 = time.monotonic()
            listing = home.json("list")
            walls.append(time.monotonic() - t0)
            after = os.times()
            cpus.append(
                after.children_user
                + after.children_system
                - before.children_user
                - before.children_system
            )
            states = [i["state"] for i in listing["instances"]]
            assert states == ["running"] * COUNT
        list_time, list_cpu = min(walls), min(cpus)
        assert list_cpu < 1.0, f"list --json used {list_cpu:.2f}s of CPU with {COUNT} running"
        assert list_time < 2.0, f"list --json took {list_time:.2f}s with {COUNT} running"

        rss = sorted(rss_kib(s.pid) for s in started)
        print(
            f"\n{COUNT} instances: started in {start_all:.1f}s, list --json {list_time:.2f}s "
            f"({list_cpu:.2f}s CPU), "
            f"RSS per daemon median {rss[COUNT // 2] / 1024:.1f} MiB "
            f"(max {rss[-1] / 1024:.1f} MiB)"
        )

        with ThreadPoolExecutor(4) as pool:
            stopped = list(pool.map(supervisor.stop, instances))
        assert sorted(stopped) == sorted(s.pid for s in started)
        assert [i["state"] for i in home.json("list")["instances"]] == ["stopped"] * COUNT
