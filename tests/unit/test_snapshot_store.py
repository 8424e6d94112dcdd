"""The snapshot blob store: objects, the compact index, key rotation phases, restore order."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from vtpmctl.store import instance_keys, snapshots
from vtpmctl.store.atomic import write_atomic
from vtpmctl.store.blob import AesKey, unwrap_file, wrap_file
from vtpmctl.store.instances import Instance, InstanceConfig, InstanceMeta, Registry
from vtpmctl.store.keys import key_fingerprint
from vtpmctl.store.snapshots import (
    RestorePendingError,
    SnapshotError,
    SnapshotStore,
    replace_state,
    restore_marker,
    settle_restore,
    snapshots_dir,
    staged_file,
)
from vtpmctl.store.statedir import StateDir

KEY = AesKey(bytes(range(32)))
KEY2 = AesKey(bytes(range(1, 33)))
PERM = b"permanent state " * 300
VOL = b"volatile state " * 600


@pytest.fixture
def store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(tmp_path / "snapshots", KEY)


def test_create_list_find(store: SnapshotStore) -> None:
    a = store.create({"permanent": PERM}, label="before")
    b = store.create({"permanent": PERM, "volatile": VOL})
    assert (a.id, b.id) == (1, 2)
    assert [s.id for s in store.all()] == [1, 2]
    assert store.find("before") == a and store.find("2") == b
    assert a.sizes == {"permanent": len(PERM)}
    assert store.read_blobs(b) == {"permanent": PERM, "volatile": VOL}
    with pytest.raises(SnapshotError, match="no snapshot"):
        store.find("nope")
    rec = b.to_json()
    assert set(rec) == {"id", "label", "created", "blobs", "sizes"}
    assert rec["blobs"]["savestate"] is None


def test_objects_are_encrypted_and_deduplicated(store: SnapshotStore) -> None:
    for _ in range(5):
        store.create({"permanent": PERM})
    names = store.object_names()
    assert len(names) == 1
    data = store.object_path(names[0]).read_bytes()
    assert PERM[:32] not in data
    assert unwrap_file(data, KEY) == PERM
    index = json.loads(store.index_path.read_bytes())
    assert len(index["states"]) == 1 and index["key"] == key_fingerprint(KEY)
    assert os.stat(store.object_path(names[0])).st_mode & 0o777 == 0o600


def test_index_entry_is_small(store: SnapshotStore) -> None:
    store.create({"permanent": PERM})
    one = store.index_path.stat().st_size
    for _ in range(99):
        store.create({"permanent": PERM})
    per_entry = (store.index_path.stat().st_size - one) / 99
    assert per_entry < 32


def test_labels(store: SnapshotStore) -> None:
    store.create({"permanent": PERM}, label="x")
    with pytest.raises(SnapshotError, match="exists already"):
        store.create({"permanent": PERM}, label="x")
    for bad in ("", " x", "a/b", "123", "tab\there"):
        with pytest.raises(SnapshotError, match="bad snapshot label"):
            store.create({"permanent": PERM}, label=bad)
    with pytest.raises(SnapshotError, match="permanent"):
        store.create({"volatile": VOL})


def test_remove_and_prune_collect_garbage(store: SnapshotStore) -> None:
    store.create({"permanent": PERM}, label="old")
    store.create({"permanent": PERM + b"1"})
    store.create({"permanent": PERM + b"2"})
    assert len(store.object_names()) == 3
    assert store.remove("old").label == "old"
    assert len(store.object_names()) == 2
    removed = store.prune(1)
    assert [s.id for s in removed] == [2]
    assert [s.id for s in store.all()] == [3]
    assert len(store.object_names()) == 1
    assert store.create({"permanent": PERM}).id == 4  # ids are never reused
    with pytest.raises(SnapshotError):
        store.prune(0)


def test_damaged_object_is_detected_and_replaced(store: SnapshotStore) -> None:
    snap = store.create({"permanent": PERM})
    path = store.object_path(snap.blobs["permanent"])
    raw = bytearray(path.read_bytes())
    raw[-40] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(SnapshotError, match="unreadable"):
        store.read_blobs(snap)
    store.create({"permanent": PERM})  # a good copy replaces the damaged one
    assert store.read_blobs(snap) == {"permanent": PERM}


def test_wrong_key_is_named(store: SnapshotStore) -> None:
    store.create({"permanent": PERM})
    other = SnapshotStore(store.root, KEY2)
    with pytest.raises(SnapshotError, match="encrypted with key"):
        other.create({"permanent": PERM})
    with pytest.raises(SnapshotError, match="unreadable"):
        other.read_blobs(other.all()[0])


def test_corrupt_index(store: SnapshotStore) -> None:
    store.create({"permanent": PERM})
    store.index_path.write_text('{"format_version": 1, "snapshots": [[1]]}')
    with pytest.raises(SnapshotError, match="corrupt"):
        store.all()


def test_rekey_stage_commit(store: SnapshotStore) -> None:
    snap = store.create({"permanent": PERM, "volatile": VOL})
    store.stage_rekey(KEY2)
    # staged but not committed: the old key still opens everything, new snapshots wait
    assert store.read_blobs(snap)["volatile"] == VOL
    with pytest.raises(SnapshotError, match="interrupted"):
        store.create({"permanent": PERM})
    SnapshotStore(store.root, None).commit_rekey(key_fingerprint(KEY2))
    SnapshotStore(store.root, None).commit_rekey(key_fingerprint(KEY2))  # replayable
    new = SnapshotStore(store.root, KEY2)
    assert new.read_blobs(snap) == {"permanent": PERM, "volatile": VOL}
    new.create({"permanent": PERM})
    assert not any(n.endswith(".rekey") for n in os.listdir(store.objects_dir))


def test_rekey_abort(store: SnapshotStore) -> None:
    snap = store.create({"permanent": PERM})
    store.stage_rekey(KEY2)
    assert SnapshotStore(store.root, None).abort_rekey() is True
    assert store.read_blobs(snap) == {"permanent": PERM}
    store.create({"permanent": PERM})
    assert SnapshotStore(store.root, None).abort_rekey() is False


def test_rekey_from_no_key(tmp_path: Path) -> None:
    plain = SnapshotStore(tmp_path / "s", None)
    snap = plain.create({"permanent": PERM})
    plain.stage_rekey(KEY)
    SnapshotStore(plain.root, None).commit_rekey(key_fingerprint(KEY))
    assert SnapshotStore(plain.root, KEY).read_blobs(snap) == {"permanent": PERM}


def test_disk_usage(store: SnapshotStore) -> None:
    store.create({"permanent": PERM})
    apparent, allocated = store.disk_usage()
    assert apparent >= len(PERM) and allocated >= apparent


# ---------------------------------------------------------------- replace_state


def _statedir(tmp_path: Path) -> StateDir:
    sd = StateDir(tmp_path / "inst" / "tpmstate", key=KEY)
    sd.ensure()
    return sd


def test_replace_state_removes_foreign_volatile(tmp_path: Path) -> None:
    sd = _statedir(tmp_path)
    sd.store("permall", b"old perm")
    sd.store("volatilestate", b"old vol")
    replace_state(sd, {"permanent": b"new perm"}, note="1")
    assert sd.load("permall") == b"new perm"
    assert not sd.exists("volatilestate")
    assert not restore_marker(sd.path).exists()
    assert sorted(os.listdir(sd.path)) == ["tpm2-00.permall"]


def test_replace_state_with_volatile(tmp_path: Path) -> None:
    sd = _statedir(tmp_path)
    sd.store("permall", b"old perm")
    replace_state(sd, {"permanent": b"new perm", "volatile": b"new vol"}, note="1")
    assert (sd.load("permall"), sd.load("volatilestate")) == (b"new perm", b"new vol")
    assert os.stat(sd.file("permall")).st_mode & 0o777 == 0o600


def _decided(sd: StateDir, blobs: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """A restore killed right after its marker was written: staged, decided, nothing replaced."""
    with monkeypatch.context() as m:
        m.setattr(snapshots, "_roll_forward", lambda sd, decision: None)
        replace_state(sd, blobs, note="1")
    assert restore_marker(sd.path).exists()


def test_interrupted_restore_rolls_forward(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every point of a crash leaves a whole TPM; settling completes the restore."""
    sd = _statedir(tmp_path)
    sd.store("permall", b"old perm")
    sd.store("volatilestate", b"old vol")
    _decided(sd, {"permanent": b"new perm", "volatile": b"new vol"}, monkeypatch)
    sd.file("volatilestate").unlink()  # then a crash after step 1 (old volatile removed)
    assert sd.load("permall") == b"old perm"  # a whole (old) TPM, needing Startup
    assert settle_restore(sd) == "finished the interrupted restore of snapshot 1"
    assert (sd.load("permall"), sd.load("volatilestate")) == (b"new perm", b"new vol")
    assert settle_restore(sd) is None
    assert sorted(os.listdir(sd.path)) == ["tpm2-00.permall", "tpm2-00.volatilestate"]


def test_restore_never_rolls_over_a_newer_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A state written after the marker (an older vtpmctl or a swtpm ran it) is kept."""
    sd = _statedir(tmp_path)
    sd.store("permall", b"old perm")
    _decided(sd, {"permanent": b"new perm"}, monkeypatch)
    sd.store("permall", b"later work")
    note = settle_restore(sd)
    assert note is not None and note.startswith("dropped the interrupted restore of snapshot 1")
    assert sd.load("permall") == b"later work"
    assert not restore_marker(sd.path).exists() and not staged_file(sd, "permall").exists()
    # a marker of an older vtpmctl does not say what it replaces: never rolled forward
    write_atomic(staged_file(sd, "permall"), wrap_file(b"new perm", KEY))
    restore_marker(sd.path).write_text(json.dumps({"snapshot": "1", "kinds": ["permanent"]}))
    assert (settle_restore(sd) or "").startswith("dropped")
    assert sd.load("permall") == b"later work"


def test_staged_files_without_a_marker_are_removed(tmp_path: Path) -> None:
    sd = _statedir(tmp_path)
    sd.store("permall", b"perm")
    write_atomic(staged_file(sd, "permall"), wrap_file(b"staged", KEY))
    assert settle_restore(sd) is None
    assert sorted(os.listdir(sd.path)) == ["tpm2-00.permall"]


def test_unreadable_marker_names_its_fix(tmp_path: Path) -> None:
    sd = _statedir(tmp_path)
    sd.store("permall", b"perm")
    restore_marker(sd.path).write_text("{garbled")
    with pytest.raises(RestorePendingError, match=r"unreadable .*; remove it .*: rm /"):
        settle_restore(sd)
    assert sd.load("permall") == b"perm"


# ---------------------------------------------------------------- key rotation of an instance


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Registry:
    monkeypatch.setenv("VTPMCTL_HOME", str(tmp_path / "h"))
    return Registry()


def make(registry: Registry, key: AesKey) -> Instance:
    """An encrypted instance with one snapshot, its state written directly (no libtpms)."""
    with registry.reserve("a") as paths:
        registry.ensure_dirs(paths)
        paths.state_dir.mkdir(mode=0o700)
        (paths.state_dir / "tpm2-00.permall").write_bytes(wrap_file(PERM, key))
        instance_keys.store_key(paths.state_key, key)
        meta = InstanceMeta(
            vtpmctl_version="test", key_fingerprint=key_fingerprint(key), cipher=key.cipher
        )
        registry.commit(paths, InstanceConfig(name="a", encrypted=True), meta)
    SnapshotStore(snapshots_dir(paths), key).create({"permanent": PERM, "volatile": VOL}, label="s")
    return registry.get("a")


def snapshot_blobs(inst: Instance, key: AesKey) -> dict[str, bytes]:
    store = SnapshotStore(snapshots_dir(inst.paths), key)
    return store.read_blobs(store.find("s"))


def test_key_rotate_reencrypts_snapshots(registry: Registry) -> None:
    inst = make(registry, KEY)
    instance_keys.rotate(inst, KEY2, "key-file")
    inst = registry.get("a")
    assert snapshot_blobs(inst, KEY2) == {"permanent": PERM, "volatile": VOL}
    with pytest.raises(SnapshotError):
        snapshot_blobs(inst, KEY)
    store = SnapshotStore(snapshots_dir(inst.paths), KEY2)
    store.create({"permanent": PERM + b"new"})  # the index knows the new key
    assert not any(n.endswith(".rekey") for n in os.listdir(store.objects_dir))


def test_key_rotate_crash_before_commit_keeps_snapshots_on_the_old_key(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    inst = make(registry, KEY)
    real_write = instance_keys.write_atomic

    def power_cut(path: Path, *args: Any) -> None:
        if path.name == "rotate.commit":  # everything is staged; the decision is lost
            raise OSError("power cut")
        real_write(path, *args)

    monkeypatch.setattr(instance_keys, "write_atomic", power_cut)
    with pytest.raises(OSError):
        instance_keys.rotate(inst, KEY2, "key-file")
    monkeypatch.undo()
    objects = snapshots_dir(inst.paths) / "objects"
    assert any(n.endswith(".rekey") for n in os.listdir(objects))
    assert instance_keys.recover(inst.paths, True) == "rolled back"
    assert not any(n.endswith(".rekey") for n in os.listdir(objects))
    assert snapshot_blobs(registry.get("a"), KEY)["permanent"] == PERM
    SnapshotStore(snapshots_dir(inst.paths), KEY).create({"permanent": PERM})


def test_key_rotate_crash_after_commit_rolls_snapshots_forward(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    inst = make(registry, KEY)

    def power_cut(*args: object) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(SnapshotStore, "commit_rekey", power_cut)
    with pytest.raises(OSError):
        instance_keys.rotate(inst, KEY2, "key-file")
    monkeypatch.undo()
    assert instance_keys.recover(inst.paths, True) == "completed"
    assert snapshot_blobs(registry.get("a"), KEY2)["volatile"] == VOL
