"""vtpmctl.store.bundle: the canonical tar, the manifest and what open_bundle refuses.

The blobs here are arbitrary bytes: libtpms is not involved at this layer (the interop
tests in tests/interop/test_bundles.py import real TPM states).
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vtpmctl.store.blob import AesKey, unwrap_transfer, wrap_transfer
from vtpmctl.store.bundle import (
    MAX_BUNDLE_SIZE,
    BundleError,
    Manifest,
    MigrationKeyError,
    Source,
    build_bundle,
    canonical_json,
    manifest_sum,
    open_bundle,
    read_capped,
    read_tar,
    write_tar,
)

PERM = bytes(range(256)) * 2 + b"permanent"
VOL = b"volatile" * 40
KEY = AesKey(bytes(range(32)))
OTHER = AesKey(bytes(range(1, 33)))
EK_JSON = b'{"eks": []}\n'


def source(**over: Any) -> Source:
    values: dict[str, Any] = dict(
        name="vm1",
        host="host-a",
        state="stopped",
        created="2025-01-02T03:04:05Z",
        vtpmctl_version="0.1.0",
        libtpms_version="0.9.2",
        tpm_version="2.0",
        transport="socket",
        encrypted_at_rest=False,
        ek_fingerprints={},
    )
    values.update(over)
    return Source(**values)


def bundle(key: AesKey | None = None, *, ek: bool = True, volatile: bool = True) -> bytes:
    plain = {"permanent": PERM, **({"volatile": VOL} if volatile else {})}
    return build_bundle(plain, source(), ek_json=EK_JSON if ek else None, migration_key=key)


# ---------------------------------------------------------------- canonical tar


def test_tar_round_trip_and_layout() -> None:
    members = [("a.txt", b"hello"), ("empty", b""), ("block", bytes(512)), ("b", b"x" * 513)]
    data = write_tar(members)
    assert len(data) % 512 == 0
    assert data.endswith(bytes(1024))
    assert read_tar(data) == members
    assert write_tar(members) == data  # deterministic


def test_tar_is_a_real_tar() -> None:
    data = bundle()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        infos = tf.getmembers()
        names = [i.name for i in infos]
        assert names == [
            "manifest.json",
            "manifest.sum",
            "ek.json",
            "permanent.blob",
            "volatile.blob",
        ]
        for info in infos:
            assert (info.mode, info.uid, info.gid, info.mtime) == (0o600, 0, 0, 0)
            assert info.isreg()
        extracted = tf.extractfile("ek.json")
        assert extracted is not None and extracted.read() == EK_JSON


def test_gnu_tar_lists_it(tmp_path: Path) -> None:
    path = tmp_path / "b.tar"
    path.write_bytes(bundle())
    out = subprocess.run(["tar", "tf", str(path)], capture_output=True, check=True, text=True)
    assert out.stdout.split() == [
        "manifest.json",
        "manifest.sum",
        "ek.json",
        "permanent.blob",
        "volatile.blob",
    ]
    assert out.stderr == ""


def test_tar_written_by_tarfile_is_refused() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        info = tarfile.TarInfo("manifest.json")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(BundleError, match="canonical form|not written by vtpmctl"):
        read_tar(buf.getvalue())


@pytest.mark.parametrize("cut", [1, 511, 512, 1024, 1536])
def test_tar_truncated_end_blocks(cut: int) -> None:
    data = write_tar([("x", b"abc")])
    with pytest.raises(BundleError, match="truncated"):
        read_tar(data[:-cut])


def test_tar_trailing_bytes_refused() -> None:
    data = write_tar([("x", b"abc")])
    with pytest.raises(BundleError, match="bytes after the end"):
        read_tar(data + bytes(512))


# ---------------------------------------------------------------- building and opening


def test_round_trip_plain() -> None:
    b = open_bundle(bundle(), None)
    assert b.plain == {"permanent": PERM, "volatile": VOL}
    assert b.ek_json == EK_JSON
    assert not b.authenticated
    m = b.manifest
    assert (m.source_name, m.source_host, m.tpm_version, m.libtpms_version) == (
        "vm1",
        "host-a",
        "2.0",
        "0.9.2",
    )
    assert [x.type for x in m.blobs] == ["permanent", "volatile"]
    assert not m.migration_key and m.migration_key_fingerprint is None


def test_blobs_are_swtpm_transfer_blobs() -> None:
    """What ``swtpm_ioctl --save`` writes: loadable with ``--load`` as they are."""
    b = open_bundle(bundle(), None)
    assert (
        b.blobs["permanent"]
        == wrap_transfer(PERM, state_key=None, keep_state_encryption=False, migration_key=None)[0]
    )
    kb = open_bundle(bundle(KEY), KEY)
    assert (
        unwrap_transfer(kb.blobs["permanent"], state_flags=0, state_key=None, migration_key=KEY)
        == PERM
    )
    assert kb.blobs["permanent"][4:6] == b"\x00\x16"  # migration data, AES-256 migration key


def test_round_trip_keyed() -> None:
    data = bundle(KEY)
    assert PERM[:64] not in data and VOL[:64] not in data
    b = open_bundle(data, KEY)
    assert b.authenticated and b.plain["volatile"] == VOL
    assert b.manifest.migration_key_cipher == "aes-256-cbc"


def test_keyed_needs_the_key() -> None:
    with pytest.raises(MigrationKeyError, match="give that key with --migration-key-file"):
        open_bundle(bundle(KEY), None)


def test_wrong_key_is_named_as_such() -> None:
    with pytest.raises(MigrationKeyError, match="^wrong migration key"):
        open_bundle(bundle(KEY), OTHER)
    with pytest.raises(MigrationKeyError, match="^wrong migration key"):
        open_bundle(bundle(KEY), AesKey(bytes(16)))


def test_key_given_for_a_plain_bundle_is_refused() -> None:
    with pytest.raises(MigrationKeyError, match="not encrypted"):
        open_bundle(bundle(), KEY)


def test_minimal_bundle() -> None:
    b = open_bundle(bundle(ek=False, volatile=False), None)
    assert list(b.plain) == ["permanent"] and b.ek_json is None


def test_no_permanent_state() -> None:
    with pytest.raises(BundleError, match="no permanent state"):
        build_bundle({"volatile": VOL}, source(), ek_json=None, migration_key=None)


# ---------------------------------------------------------------- damage


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "keyed"])
def test_every_single_byte_change_is_refused(key: AesKey | None) -> None:
    data = bundle(key)
    for offset in range(len(data)):
        damaged = bytearray(data)
        damaged[offset] ^= 0x01 if offset % 3 else 0x80
        with pytest.raises(BundleError):
            open_bundle(bytes(damaged), key)


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "keyed"])
def test_every_truncation_is_refused(key: AesKey | None) -> None:
    data = bundle(key)
    for size in range(len(data)):
        with pytest.raises(BundleError):
            open_bundle(data[:size], key)


def test_empty_and_oversized() -> None:
    with pytest.raises(BundleError, match="empty"):
        open_bundle(b"", None)
    with pytest.raises(BundleError, match="larger than"):
        read_capped(io.BytesIO(bytes(MAX_BUNDLE_SIZE + 1)), "stdin")
    assert read_capped(io.BytesIO(b"abc"), "x") == b"abc"


# ---------------------------------------------------------------- lying manifests


def reforge(
    data: bytes,
    edit: Callable[[dict[str, Any]], None],
    key: AesKey | None = None,
    members: Callable[[dict[str, bytes]], None] | None = None,
) -> bytes:
    """Change the manifest (and maybe members) and make every checksum agree again."""
    content = dict(read_tar(data))
    if members is not None:
        members(content)
    manifest = json.loads(content["manifest.json"])
    edit(manifest)
    text = canonical_json(manifest)
    content["manifest.json"] = text
    content["manifest.sum"] = manifest_sum(text, key)
    order = [
        "manifest.json",
        "manifest.sum",
        "ek.json",
        "permanent.blob",
        "volatile.blob",
        "savestate.blob",
    ]
    return write_tar([(n, content[n]) for n in order if n in content])


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda m: m.__setitem__(key, value)


def _blob0(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda m: m["blobs"][0].__setitem__(key, value)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


LIES: dict[str, Callable[[dict[str, Any]], None]] = {
    "sha256": _blob0("sha256", "0" * 64),
    "size": _blob0("size", 17),
    "size-type": _blob0("size", "5"),
    "type": _blob0("type", "volatile"),
    "member-name": _blob0("member", "permanent.bin"),
    "encrypted-flag": _blob0("encrypted", True),
    "drop-volatile": lambda m: m["blobs"].pop(),
    "drop-ek-file": lambda m: m["files"].clear(),
    "savestate-on-tpm2": lambda m: m["blobs"].append(
        {
            "type": "savestate",
            "member": "savestate.blob",
            "size": 1,
            "sha256": "0" * 64,
            "encrypted": False,
        }
    ),
    "claims-key": lambda m: m.update(
        migration_key=True, migration_key_cipher="aes-256-cbc", migration_key_fingerprint="00" * 8
    ),
    "format-version": _set("format_version", 2),
    "format": _set("format", "something-else"),
    "tpm-version": _set("tpm_version", "3.0"),
    "source-state": _set("source_state", "paused"),
    "extra-key": _set("note", "hi"),
    "missing-key": lambda m: m.pop("libtpms_version"),
    "bool-as-int": _set("encrypted_at_rest", 0),
    "ek-fingerprint": _set("ek_fingerprints", {"rsa2048": "xyz"}),
    "not-an-object": lambda m: m.clear(),
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_lying_manifest_is_refused(lie: str) -> None:
    forged = reforge(bundle(), LIES[lie])
    with pytest.raises(BundleError):
        open_bundle(forged, None)


def test_manifest_must_be_canonical_json() -> None:
    def loosen(content: dict[str, bytes]) -> None:
        content["manifest.json"] = content["manifest.json"].replace(b"\n  ", b"\n   ", 1)

    data = bundle()
    content = dict(read_tar(data))
    loosen(content)
    content["manifest.sum"] = manifest_sum(content["manifest.json"], None)
    forged = write_tar(list(content.items()))
    with pytest.raises(BundleError, match="canonical"):
        open_bundle(forged, None)


def test_deeply_nested_manifest_is_a_bundle_error() -> None:
    """Checksums made to agree over JSON nested past Python's recursion limit."""
    content = dict(read_tar(bundle()))
    text = b"[" * 100_000 + b"]" * 100_000
    content["manifest.json"] = text
    content["manifest.sum"] = manifest_sum(text, None)
    with pytest.raises(BundleError, match="not valid JSON"):
        open_bundle(write_tar(list(content.items())), None)


def test_swapped_blob_with_matching_hash_is_refused_by_header_check() -> None:
    """A plain blob in a bundle that says it is encrypted (hashes made to agree)."""
    plain_blob = wrap_transfer(
        PERM, state_key=None, keep_state_encryption=False, migration_key=None
    )[0]

    def swap(content: dict[str, bytes]) -> None:
        content["permanent.blob"] = plain_blob

    def fix(m: dict[str, Any]) -> None:
        m["blobs"][0].update(size=len(plain_blob), sha256=_sha(plain_blob))

    forged = reforge(bundle(KEY), fix, key=KEY, members=swap)
    with pytest.raises(BundleError, match="permanent blob .* unusable"):
        open_bundle(forged, KEY)


def test_keyed_manifest_cannot_be_changed_without_the_key() -> None:
    data = bundle(KEY)
    content = dict(read_tar(data))
    manifest = json.loads(content["manifest.json"])
    manifest["source_host"] = "evil"
    text = canonical_json(manifest)
    mac_line = content["manifest.sum"].splitlines(keepends=True)[1]
    content["manifest.json"] = text
    content["manifest.sum"] = manifest_sum(text, None) + mac_line
    forged = write_tar(list(content.items()))
    with pytest.raises(BundleError, match="fails authentication"):
        open_bundle(forged, KEY)
    # Dropping the MAC line and the key claim makes it a plain bundle with encrypted blobs.
    stripped = reforge(
        data,
        lambda m: m.update(
            migration_key=False,
            migration_key_cipher=None,
            migration_key_fingerprint=None,
            blobs=[dict(b, encrypted=False) for b in m["blobs"]],
        ),
    )
    with pytest.raises(BundleError, match="unusable"):
        open_bundle(stripped, None)
    with pytest.raises(MigrationKeyError, match="not encrypted"):
        open_bundle(stripped, KEY)


def test_manifest_json_shape() -> None:
    m = open_bundle(bundle(KEY), KEY).manifest
    obj = m.to_json()
    assert Manifest.from_json(obj) == m
    assert set(obj) == {
        "format",
        "format_version",
        "created",
        "source_host",
        "source_name",
        "source_state",
        "vtpmctl_version",
        "libtpms_version",
        "tpm_version",
        "transport",
        "encrypted_at_rest",
        "migration_key",
        "migration_key_cipher",
        "migration_key_fingerprint",
        "ek_fingerprints",
        "blobs",
        "files",
    }
