"""The instance registry: names, roots, paths, records, create/remove, key rotation."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from vtpmctl.store import instance_keys
from vtpmctl.store.blob import AesKey, unwrap_file, wrap_file
from vtpmctl.store.instances import (
    MAX_NAME,
    Instance,
    InstanceConfig,
    InstanceError,
    InstanceExists,
    InstanceMeta,
    NoSuchInstance,
    Registry,
    validate_name,
)
from vtpmctl.store.keys import KeyFileError, key_fingerprint
from vtpmctl.store.paths import Roots, store_roots

KEY_A = AesKey(bytes(range(32)))
KEY_B = AesKey(bytes(range(32, 64)))


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Registry:
    monkeypatch.setenv("VTPMCTL_HOME", str(tmp_path / "h"))
    return Registry()


def make(
    registry: Registry, name: str, key: AesKey | None = None, files: dict[str, bytes] | None = None
) -> Instance:
    """A registered instance whose state files are written directly (no libtpms)."""
    with registry.reserve(name) as paths:
        registry.ensure_dirs(paths)
        paths.state_dir.mkdir(mode=0o700)
        for fname, plain in (files or {"permall": b"P" * 100}).items():
            (paths.state_dir / f"tpm2-00.{fname}").write_bytes(wrap_file(plain, key))
        meta = InstanceMeta(vtpmctl_version="test")
        if key is not None:
            instance_keys.store_key(paths.state_key, key)
            meta.key_fingerprint = key_fingerprint(key)
            meta.cipher = key.cipher
        registry.commit(paths, InstanceConfig(name=name, encrypted=key is not None), meta)
    return registry.get(name)


# ---------------------------------------------------------------- names and roots


@pytest.mark.parametrize("name", ["a", "vm-01", "Web_1.prod", "0", "x" * MAX_NAME])
def test_good_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", ".hidden", "-x", "a/b", "a b", "a:b", "é", "x" * (MAX_NAME + 1), "a\n", "_x"],
)
def test_bad_names(name: str) -> None:
    with pytest.raises(InstanceError, match="invalid instance name"):
        validate_name(name)


def test_home_overrides_everything(tmp_path: Path) -> None:
    env = {"VTPMCTL_HOME": str(tmp_path), "STATE_DIRECTORY": "/srv/x"}
    r = store_roots(env, euid=0)
    assert r == Roots(
        tmp_path / "etc", tmp_path / "lib", tmp_path / "run", tmp_path / "log", "home"
    )


def test_root_uses_fhs_dirs() -> None:
    r = store_roots({}, euid=0)
    assert (r.config, r.state, r.runtime, r.logs) == (
        Path("/etc/vtpmctl"),
        Path("/var/lib/vtpmctl"),
        Path("/run/vtpmctl"),
        Path("/var/log/vtpmctl"),
    )


def test_systemd_dirs_win_over_defaults() -> None:
    env = {
        "STATE_DIRECTORY": "/var/lib/vt:/other",
        "RUNTIME_DIRECTORY": "/run/vt",
        "LOGS_DIRECTORY": "relative/ignored",
    }
    r = store_roots(env, euid=0)
    assert r.state == Path("/var/lib/vt")
    assert r.runtime == Path("/run/vt")
    assert r.logs == Path("/var/log/vtpmctl")


def test_users_get_their_own_dirs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "rt"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "st"))
    r = store_roots({}, euid=1000)
    assert r.origin == "user"
    assert r.config == tmp_path / "cfg" / "vtpmctl"
    assert str(r.state).startswith(str(tmp_path / "st"))


def test_paths_layout(registry: Registry) -> None:
    p = registry.paths("vm1")
    home = registry.roots.state.parent
    assert p.state_dir == home / "lib/instances/vm1/tpmstate"
    assert p.state_key == home / "etc/instances/vm1/state.key"
    assert p.ctrl_socket == Path(f"{p.data_socket}.ctrl")  # the tss2 swtpm TCTI layout
    assert p.log_file == home / "log/vm1.log"
    assert p.device == Path("/dev/vtpm-vm1")


def test_socket_path_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VTPMCTL_HOME", str(tmp_path / ("d" * 60)))
    reg = Registry()
    with pytest.raises(InstanceError, match="107-byte limit"), reg.reserve("n" * 60):
        pass
    assert reg.names() == []


# ---------------------------------------------------------------- create, list, remove


def test_create_list_remove(registry: Registry) -> None:
    make(registry, "b")
    make(registry, "a", key=KEY_A)
    assert registry.names() == ["a", "b"]
    inst = registry.get("a")
    assert inst.config.encrypted and inst.meta.cipher == "aes-256-cbc"
    assert stat.S_IMODE(inst.paths.state_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(inst.paths.secrets_dir.stat().st_mode) == 0o700
    assert json.loads(inst.paths.config_file.read_text())["format_version"] == 1
    registry.remove("a")
    assert registry.names() == ["b"]
    for gone in (inst.paths.base, inst.paths.secrets_dir, inst.paths.run_dir):
        assert not gone.exists()
    with pytest.raises(NoSuchInstance):
        registry.get("a")
    with pytest.raises(NoSuchInstance):
        registry.remove("a")


def test_duplicate_name(registry: Registry) -> None:
    make(registry, "a")
    with pytest.raises(InstanceExists, match="exists already"), registry.reserve("a"):
        pass
    assert registry.get("a").config.name == "a"  # untouched


def test_failed_create_leaves_nothing(registry: Registry) -> None:
    with pytest.raises(RuntimeError), registry.reserve("a") as paths:
        registry.ensure_dirs(paths)
        instance_keys.store_key(paths.state_key, KEY_A)
        raise RuntimeError("manufacture failed")
    assert registry.names() == []
    assert not registry.paths("a").base.exists()
    assert not registry.paths("a").secrets_dir.exists()


def test_interrupted_create_is_hidden_and_removable(registry: Registry) -> None:
    paths = registry.paths("a")
    paths.base.mkdir(parents=True)  # a create that crashed before its commit
    assert registry.names() == []
    with pytest.raises(InstanceExists, match="interrupted create"), registry.reserve("a"):
        pass
    registry.remove("a")
    make(registry, "a")


def test_remove_refuses_while_create_runs(registry: Registry) -> None:
    # fcntl locks are per process: the creator must be another one.
    code = (
        "import sys, time; from vtpmctl.store.instances import Registry\n"
        "with Registry().reserve('a'):\n print('ready', flush=True); time.sleep(30)"
    )
    creator = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert creator.stdout is not None and creator.stdout.readline() == b"ready\n"
        with pytest.raises(InstanceError, match="being created"):
            registry.remove("a")
    finally:
        creator.kill()
        creator.wait()


def test_corrupt_config_is_one_clear_error(registry: Registry) -> None:
    inst = make(registry, "a")
    inst.paths.config_file.write_text("{not json")
    with pytest.raises(InstanceError, match="not valid JSON; restore"):
        registry.get("a")
    assert [type(x) for x in registry.all()] == [InstanceError]


def test_newer_format_is_refused(registry: Registry) -> None:
    inst = make(registry, "a")
    inst.paths.meta_file.write_text(json.dumps({"format_version": 99}))
    with pytest.raises(InstanceError, match="upgrade vtpmctl"):
        registry.get("a")


# ---------------------------------------------------------------- keys


def test_state_key_checks(registry: Registry) -> None:
    inst = make(registry, "a", key=KEY_A)
    assert instance_keys.load_state_key(inst) == KEY_A
    inst.paths.state_key.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        instance_keys.load_state_key(inst)
    instance_keys.store_key(inst.paths.state_key, KEY_B)
    with pytest.raises(KeyFileError, match="not the key"):
        instance_keys.load_state_key(inst)
    inst.paths.state_key.unlink()
    with pytest.raises(KeyFileError, match="missing"):
        instance_keys.load_state_key(inst)


def _plain(inst: Instance, name: str, key: AesKey | None) -> bytes:
    return unwrap_file((inst.paths.state_dir / f"tpm2-00.{name}").read_bytes(), key)


def test_rotate_reencrypts_every_file(registry: Registry) -> None:
    inst = make(registry, "a", key=KEY_A, files={"permall": b"P" * 99, "volatilestate": b"V"})
    instance_keys.rotate(inst, KEY_B, "key-file")
    inst = registry.get("a")
    assert _plain(inst, "permall", KEY_B) == b"P" * 99
    assert _plain(inst, "volatilestate", KEY_B) == b"V"
    assert instance_keys.load_state_key(inst) == KEY_B
    assert inst.meta.key_fingerprint == key_fingerprint(KEY_B)
    assert sorted(os.listdir(inst.paths.secrets_dir)) == ["state.key"]
    assert not any(n.endswith(".rotate") for n in os.listdir(inst.paths.state_dir))


def test_rotate_enables_encryption(registry: Registry) -> None:
    inst = make(registry, "a")
    instance_keys.rotate(inst, KEY_B, "key-file")
    inst = registry.get("a")
    assert inst.config.encrypted
    assert _plain(inst, "permall", KEY_B) == b"P" * 100


def test_rotate_with_wrong_old_key_changes_nothing(registry: Registry) -> None:
    inst = make(registry, "a", key=KEY_A)
    before = {p.name: p.read_bytes() for p in inst.paths.state_dir.iterdir()}
    (inst.paths.state_dir / "tpm2-00.permall").write_bytes(wrap_file(b"x", KEY_B))
    with pytest.raises(Exception, match="unusable"):
        instance_keys.rotate(inst, KEY_B, "key-file")
    assert instance_keys.recover(inst.paths, True) is None
    assert instance_keys.load_state_key(registry.get("a")) == KEY_A
    assert set(os.listdir(inst.paths.state_dir)) == set(before)


def test_crash_before_commit_rolls_back(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    inst = make(registry, "a", key=KEY_A)

    def crash(*args: object) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(instance_keys, "finish", crash)
    monkeypatch.setattr(instance_keys, "_marker", lambda p: p.secrets_dir / "never")
    with pytest.raises(OSError):
        instance_keys.rotate(inst, KEY_B, "key-file")
    monkeypatch.undo()
    (inst.paths.secrets_dir / "never").unlink()  # as if the marker write never happened
    assert instance_keys.recover(inst.paths, True) == "rolled back"
    inst = registry.get("a")
    assert instance_keys.load_state_key(inst) == KEY_A
    assert _plain(inst, "permall", KEY_A) == b"P" * 100
    assert sorted(os.listdir(inst.paths.secrets_dir)) == ["state.key"]


def test_crash_after_commit_rolls_forward(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    inst = make(registry, "a", key=KEY_A, files={"permall": b"P", "volatilestate": b"V"})
    real_rename = os.rename
    calls = []

    def rename_once(src: object, dst: object) -> None:
        if str(src).endswith(".rotate"):
            calls.append(src)
        if len(calls) == 2:  # permall switched, the rest not yet
            raise OSError("power cut")
        real_rename(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(instance_keys.os, "rename", rename_once)
    with pytest.raises(OSError):
        instance_keys.rotate(inst, KEY_B, "key-file")
    monkeypatch.undo()
    assert instance_keys.recover(inst.paths, True) == "completed"
    inst = registry.get("a")
    assert instance_keys.load_state_key(inst) == KEY_B
    assert _plain(inst, "permall", KEY_B) == b"P"
    assert _plain(inst, "volatilestate", KEY_B) == b"V"
    assert instance_keys.recover(inst.paths, True) is None


def test_start_keeps_one_previous_log(registry: Registry) -> None:
    from vtpmctl.usecases.supervisor import rotate_log

    inst = make(registry, "a")
    registry.ensure_dirs(inst.paths)
    log = inst.paths.log_file
    log.write_bytes(b"x" * 100)
    rotate_log(log, limit=1000)
    assert log.read_bytes() == b"x" * 100  # small: left alone
    rotate_log(log, limit=10)
    assert not log.exists() and log.with_name(log.name + ".1").read_bytes() == b"x" * 100
    registry.remove("a")
    assert not log.with_name(log.name + ".1").exists()
