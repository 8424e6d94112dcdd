"""A swtpm that another manager runs is visible to vtpmctl, readable, and never taken over.

A real ``swtpm socket`` stands in for libvirt's or Proxmox's: ``list`` and ``status``
show it with who runs it; ``snapshot create``, ``verify`` and ``migrate export
--allow-running`` read it through its control channel; ``stop`` and ``rm`` refuse;
on swtpm's linear file backend (Proxmox's) as on a state dir.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from instance_helpers import AttachedHome, Home, home_at
from swtpm_peer import swtpm_socket


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    with home_at(tmp_path / "h") as h:
        yield AttachedHome(h.path)


def test_attached_swtpm_is_listed_read_and_left_alone(home: Home, tmp_path: Path) -> None:
    with swtpm_socket(tmp_path / "state", ctrl="unix", data="unix") as tpm:
        name = f"swtpm-{tpm.proc.pid}"
        listed = {i["name"]: i for i in home.json("list")["instances"]}
        record = listed[name]
        assert record["state"] == "running"
        assert record["pid"] == tpm.proc.pid
        assert record["owner"].endswith("(root)")
        assert record["state_dir"] == str(tmp_path / "state")
        assert record["endpoints"]["ctrl"] == f"unix:{tpm.ctrl.path}"
        code, status = home.status(name)
        assert code == 0 and status["owner"] == record["owner"]

        home.run("snapshot", "create", name)
        assert len(home.json("snapshot", "list", name)["snapshots"]) == 1
        findings = home.json("verify", name)
        assert findings["errors"] == 0, findings
        home.run("migrate", "export", name, "--allow-running", "-o", str(tmp_path / "b"))
        assert (tmp_path / "b").stat().st_size > 0

        for refused in (["stop", name], ["rm", name, "--yes"]):
            res = home.run(*refused, check=False)
            assert res.returncode != 0
        assert tpm.running

    # a private store does not see host-wide vTPMs unless asked to
    plain = Home(home.path)
    assert all(not i["name"].startswith("swtpm-") for i in plain.json("list")["instances"])


def test_real_swtpm_on_a_linear_file_is_listed_and_read(home: Home, tmp_path: Path) -> None:
    """Proxmox's backend with the real swtpm: no lock on the file, its process holds it."""
    state = tmp_path / "vm-102-disk-1.raw"
    with swtpm_socket(extra_args=["--tpmstate", f"backend-uri=file://{state}"]) as tpm:
        tpm.tpm2("getrandom", "8")
        name = f"swtpm-{tpm.proc.pid}"
        record = {i["name"]: i for i in home.json("list")["instances"]}[name]
        assert record["state"] == "running" and record["state_dir"] == str(state), record
        assert home.json("snapshot", "create", name)["source"] == "control channel"
        assert home.json("verify", name)["errors"] == 0
        home.run("migrate", "export", name, "--allow-running", "-o", str(tmp_path / "b"))
        res = home.run("snapshot", "restore", name, "1", check=False)
        assert res.returncode == 1 and "never" in res.stderr
        assert tpm.running
