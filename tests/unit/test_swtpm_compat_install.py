"""`vtpmctl swtpm-compat install|uninstall DIR` and the multi-call entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vtpmctl.compat.main import program_of
from vtpmctl.model import SwtpmProgram
from vtpmctl.usecases import swtpm_compat

ROOT = Path(__file__).resolve().parents[2]
NAMES = [p.value for p in SwtpmProgram]


def _vtpmctl(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "vtpmctl", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_install_writes_three_launchers_and_uninstall_removes_them(tmp_path: Path) -> None:
    res = _vtpmctl("swtpm-compat", "install", str(tmp_path))
    assert res.returncode == 0, res.stderr
    for name in NAMES:
        path = tmp_path / name
        assert path.is_file() and not path.is_symlink()
        assert path.stat().st_mode & 0o7777 == 0o755
        assert swtpm_compat.is_launcher(path)
    # a second install replaces its own launchers
    assert _vtpmctl("swtpm-compat", "install", str(tmp_path)).returncode == 0
    res = _vtpmctl("swtpm-compat", "uninstall", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(tmp_path)) == []


def test_install_never_overwrites_a_foreign_file(tmp_path: Path) -> None:
    (tmp_path / "swtpm_ioctl").write_text("#!/bin/sh\necho mine\n")
    res = _vtpmctl("swtpm-compat", "install", str(tmp_path))
    assert res.returncode == 1
    assert "not a vtpmctl launcher" in res.stderr
    assert sorted(os.listdir(tmp_path)) == ["swtpm_ioctl"]  # nothing written
    (tmp_path / "swtpm_ioctl").unlink()
    os.symlink("/usr/bin/swtpm", tmp_path / "swtpm")  # a link is never ours either
    assert _vtpmctl("swtpm-compat", "install", str(tmp_path)).returncode == 1


def test_uninstall_leaves_foreign_files(tmp_path: Path) -> None:
    swtpm_compat.install(tmp_path)
    (tmp_path / "swtpm").unlink()
    (tmp_path / "swtpm").write_text("not ours\n")
    res = _vtpmctl("swtpm-compat", "uninstall", str(tmp_path))
    assert res.returncode == 1
    assert "left alone" in res.stderr
    assert sorted(os.listdir(tmp_path)) == ["swtpm"]


@pytest.mark.parametrize("system", ["/usr/bin", "/bin", "/usr/sbin"])
def test_system_dirs_are_refused(system: str) -> None:
    res = _vtpmctl("swtpm-compat", "install", system)
    assert res.returncode == 1
    assert "/usr/local/bin" in res.stderr


def test_missing_dir_is_one_line(tmp_path: Path) -> None:
    res = _vtpmctl("swtpm-compat", "install", str(tmp_path / "nope"))
    assert res.returncode == 1
    assert "not a directory" in res.stderr and len(res.stderr.splitlines()) == 1


def test_program_by_argv0() -> None:
    assert program_of("/usr/local/bin/swtpm") is SwtpmProgram.SWTPM
    assert program_of("swtpm_setup") is SwtpmProgram.SWTPM_SETUP
    assert program_of("/x/swtpm_ioctl") is SwtpmProgram.SWTPM_IOCTL
    assert program_of("/x/python3") is None


def test_launcher_runs_the_program_its_name_says(tmp_path: Path) -> None:
    swtpm_compat.install(tmp_path, python=sys.executable)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run(
        [str(tmp_path / "swtpm"), "--version"], capture_output=True, text=True, env=env, timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("TPM emulator version 0.7.1")


def test_libvirt_swtpm_user_from_qemu_conf(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    assert swtpm_compat.libvirt_swtpm_user(conf) is None  # no libvirt
    conf.write_text('#swtpm_user = "nobody"\n')
    assert swtpm_compat.libvirt_swtpm_user(conf) == "tss"
    conf.write_text('swtpm_user = "swtpm"\nswtpm_group = "swtpm"\n')
    assert swtpm_compat.libvirt_swtpm_user(conf) == "swtpm"


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_a_launcher_the_swtpm_user_cannot_run_is_reported(tmp_path: Path) -> None:
    """A venv under a private directory (/root) is out of reach of libvirt's swtpm user."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    os.chmod(private, 0o700)
    python = private / "python3"
    os.symlink(sys.executable, python)
    directory = tmp_path / "bin"
    directory.mkdir()
    swtpm_compat.install(directory, python=str(python))
    why = swtpm_compat.cannot_run(directory / "swtpm", "nobody")
    assert why is not None
    assert swtpm_compat.cannot_run(directory / "swtpm", "root") is None  # root reaches it
    assert swtpm_compat.cannot_run(directory / "swtpm", "no-such-user-x") is None
