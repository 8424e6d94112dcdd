"""The bytes of every JSON record vtpmctl writes, pinned as literals.

config.json, meta.json, a bundle's manifest.json (and the bundle around it)
and the inspect child's answer are formats other versions read: the literals
below are what vtpmctl 0.1.0 writes, and a change to how records are turned
into JSON must leave them byte for byte as they are.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from vtpmctl.store.bundle import (
    BlobInfo,
    Manifest,
    Source,
    build_bundle,
    canonical_json,
    open_bundle,
    read_tar,
)
from vtpmctl.store.instances import InstanceConfig, InstanceMeta, write_json
from vtpmctl.usecases.inspect import InspectResult


def written(tmp_path: Path, record: dict[str, object]) -> bytes:
    path = tmp_path / "record.json"
    write_json(path, record)
    return path.read_bytes()


# ---------------------------------------------------------------- config.json and meta.json

CONFIG_CUSE = (
    b'{\n  "ek": true,\n  "encrypted": true,\n  "format_version": 1,\n'
    b'  "migration_key": true,\n  "name": "vm1",\n  "tpm": "2.0",\n  "transport": "cuse"\n}\n'
)
CONFIG_TPM12 = (
    b'{\n  "ek": false,\n  "encrypted": false,\n  "format_version": 1,\n'
    b'  "migration_key": false,\n  "name": "old-1.2",\n  "tpm": "1.2",\n'
    b'  "transport": "socket"\n}\n'
)
META_FULL = (
    b'{\n  "cipher": "aes-256-cbc",\n  "created": "2026-01-02T03:04:05Z",\n'
    b'  "ek_fingerprints": {\n'
    b'    "ecc-nist-p384": "' + b"b" * 64 + b'",\n'
    b'    "rsa2048": "' + b"a" * 64 + b'"\n'
    b'  },\n  "format_version": 1,\n  "key_fingerprint": "0123456789abcdef",\n'
    b'  "key_source": "generated",\n  "libtpms_version": "0.10.0",\n'
    b'  "migration_key_fingerprint": null,\n  "vtpmctl_version": "0.1.0"\n}\n'
)
META_EMPTY = (
    b'{\n  "cipher": null,\n  "created": "",\n  "ek_fingerprints": {},\n'
    b'  "format_version": 1,\n  "key_fingerprint": null,\n  "key_source": null,\n'
    b'  "libtpms_version": null,\n  "migration_key_fingerprint": null,\n'
    b'  "vtpmctl_version": ""\n}\n'
)


def full_meta() -> InstanceMeta:
    return InstanceMeta(
        created="2026-01-02T03:04:05Z",
        vtpmctl_version="0.1.0",
        libtpms_version="0.10.0",
        cipher="aes-256-cbc",
        key_source="generated",
        key_fingerprint="0123456789abcdef",
        ek_fingerprints={"rsa2048": "a" * 64, "ecc-nist-p384": "b" * 64},
    )


def test_config_bytes(tmp_path: Path) -> None:
    cuse = InstanceConfig(name="vm1", transport="cuse", encrypted=True, migration_key=True)
    assert written(tmp_path, cuse.to_json()) == CONFIG_CUSE
    old = InstanceConfig(name="old-1.2", tpm="1.2", ek=False)
    assert written(tmp_path, old.to_json()) == CONFIG_TPM12
    where = tmp_path / "config.json"
    for config, data in ((cuse, CONFIG_CUSE), (old, CONFIG_TPM12)):
        assert InstanceConfig.from_json(json.loads(data), where) == config


def test_meta_bytes(tmp_path: Path) -> None:
    assert written(tmp_path, full_meta().to_json()) == META_FULL
    assert written(tmp_path, InstanceMeta(created="").to_json()) == META_EMPTY
    where = tmp_path / "meta.json"
    assert InstanceMeta.from_json(json.loads(META_FULL), where) == full_meta()
    assert InstanceMeta.from_json(json.loads(META_EMPTY), where) == InstanceMeta(created="")


# ---------------------------------------------------------------- the bundle manifest

MANIFEST_PLAIN = (
    b'{\n  "blobs": [\n    {\n      "encrypted": false,\n      "member": "permanent.blob",\n'
    b'      "sha256": "323a454f6b22d991f5214707c1c8d9b75447fffa66e084282b9bf2be052f0175",\n'
    b'      "size": 322,\n      "type": "permanent"\n    },\n'
    b'    {\n      "encrypted": false,\n      "member": "volatile.blob",\n'
    b'      "sha256": "ee53b42feead24734ee245b417b3e6ff2b2b456006354f5c6ff115fc1c367986",\n'
    b'      "size": 122,\n      "type": "volatile"\n    }\n  ],\n'
    b'  "created": "2025-01-02T03:04:05Z",\n  "ek_fingerprints": {\n'
    b'    "rsa2048": "' + b"c" * 64 + b'"\n  },\n'
    b'  "encrypted_at_rest": true,\n  "files": [\n    {\n      "member": "ek.json",\n'
    b'      "sha256": "bd7c0488546daf74a21983d3879d57cb408831ccf565c41bed351c35c347949c",\n'
    b'      "size": 12\n    }\n  ],\n'
    b'  "format": "vtpmctl-migration-bundle",\n  "format_version": 1,\n'
    b'  "libtpms_version": null,\n  "migration_key": false,\n'
    b'  "migration_key_cipher": null,\n  "migration_key_fingerprint": null,\n'
    b'  "source_host": "host-a",\n  "source_name": "vm1",\n  "source_state": "running",\n'
    b'  "tpm_version": "2.0",\n  "transport": "cuse",\n  "vtpmctl_version": "0.1.0"\n}\n'
)
# The same manifest as `vtpmctl migrate export --json` prints it: field order, not sorted.
MANIFEST_PLAIN_OUTPUT = (
    '{"format": "vtpmctl-migration-bundle", "format_version": 1, '
    '"created": "2025-01-02T03:04:05Z", "source_host": "host-a", "source_name": "vm1", '
    '"source_state": "running", "vtpmctl_version": "0.1.0", "libtpms_version": null, '
    '"tpm_version": "2.0", "transport": "cuse", "encrypted_at_rest": true, '
    '"migration_key": false, "migration_key_cipher": null, "migration_key_fingerprint": null, '
    '"ek_fingerprints": {"rsa2048": "' + "c" * 64 + '"}, '
    '"blobs": [{"type": "permanent", "member": "permanent.blob", "size": 322, '
    '"sha256": "323a454f6b22d991f5214707c1c8d9b75447fffa66e084282b9bf2be052f0175", '
    '"encrypted": false}, {"type": "volatile", "member": "volatile.blob", "size": 122, '
    '"sha256": "ee53b42feead24734ee245b417b3e6ff2b2b456006354f5c6ff115fc1c367986", '
    '"encrypted": false}], "files": [{"member": "ek.json", "size": 12, '
    '"sha256": "bd7c0488546daf74a21983d3879d57cb408831ccf565c41bed351c35c347949c"}]}'
)
BUNDLE_PLAIN_SHA256 = "c6937bd282d377a450d16f344d0985e1f996efe6aa0ccfb5674bec442457e2ad"
MANIFEST_KEYED = (
    b'{\n  "blobs": [\n    {\n      "encrypted": true,\n      "member": "permanent.blob",\n'
    b'      "sha256": "' + b"e" * 64 + b'",\n      "size": 396,\n      "type": "permanent"\n'
    b'    }\n  ],\n  "created": "2025-01-02T03:04:05Z",\n  "ek_fingerprints": {},\n'
    b'  "encrypted_at_rest": false,\n  "files": [],\n'
    b'  "format": "vtpmctl-migration-bundle",\n  "format_version": 1,\n'
    b'  "libtpms_version": "0.10.0",\n  "migration_key": true,\n'
    b'  "migration_key_cipher": "aes-128-cbc",\n'
    b'  "migration_key_fingerprint": "d9c0b63819845a16",\n'
    b'  "source_host": "host-a",\n  "source_name": "vm1",\n  "source_state": "stopped",\n'
    b'  "tpm_version": "2.0",\n  "transport": "socket",\n  "vtpmctl_version": "0.1.0"\n}\n'
)


def plain_bundle() -> bytes:
    src = Source(
        name="vm1",
        host="host-a",
        state="running",
        created="2025-01-02T03:04:05Z",
        vtpmctl_version="0.1.0",
        libtpms_version=None,
        tpm_version="2.0",
        transport="cuse",
        encrypted_at_rest=True,
        ek_fingerprints={"rsa2048": "c" * 64},
    )
    plain = {"permanent": b"P" * 300, "volatile": b"V" * 100}
    return build_bundle(plain, src, ek_json=b'{"eks": []}\n', migration_key=None)


def test_bundle_and_manifest_bytes() -> None:
    data = plain_bundle()
    assert hashlib.sha256(data).hexdigest() == BUNDLE_PLAIN_SHA256
    assert dict(read_tar(data))["manifest.json"] == MANIFEST_PLAIN
    manifest = open_bundle(data, None).manifest
    assert canonical_json(manifest.to_json()) == MANIFEST_PLAIN
    assert json.dumps(manifest.to_json()) == MANIFEST_PLAIN_OUTPUT


def test_keyed_manifest_bytes() -> None:
    manifest = Manifest(
        created="2025-01-02T03:04:05Z",
        source_host="host-a",
        source_name="vm1",
        source_state="stopped",
        vtpmctl_version="0.1.0",
        libtpms_version="0.10.0",
        tpm_version="2.0",
        transport="socket",
        encrypted_at_rest=False,
        migration_key=True,
        migration_key_cipher="aes-128-cbc",
        migration_key_fingerprint="d9c0b63819845a16",
        blobs=[
            BlobInfo(
                member="permanent.blob", size=396, sha256="e" * 64, type="permanent", encrypted=True
            )
        ],
        files=[],
    )
    assert canonical_json(manifest.to_json()) == MANIFEST_KEYED
    assert Manifest.from_json(json.loads(MANIFEST_KEYED)) == manifest


# ---------------------------------------------------------------- the inspect child's answer

INSPECT_FULL = (
    '{"ok": false, "validate": {"permanent": 0, "volatile": 257}, '
    '"persistent": {"0x81010001": "000b' + "d" * 64 + '"}, '
    '"nv": {"0x01c00002": {"attributes": 1645150210, "size": 1200, "sha256": null}}, '
    '"ek": null, "error": "the TPM does not start", "log": ["libtpms: x"], '
    '"libtpms_version": "0.9.2"}'
)
INSPECT_GOOD = (
    '{"ok": true, "validate": {"permanent": 0}, "persistent": null, "nv": null, '
    '"ek": null, "error": null, "log": [], "libtpms_version": null}'
)


def full_inspect() -> InspectResult:
    return InspectResult(
        ok=False,
        validate={"permanent": 0, "volatile": 0x101},
        persistent={"0x81010001": "000b" + "d" * 64},
        nv={"0x01c00002": {"attributes": 0x620F0002, "size": 1200, "sha256": None}},
        error="the TPM does not start",
        log=["libtpms: x"],
        libtpms_version="0.9.2",
    )


def test_inspect_result_bytes() -> None:
    assert json.dumps(full_inspect().to_json()) == INSPECT_FULL
    good = InspectResult(ok=True, validate={"permanent": 0})
    assert json.dumps(good.to_json()) == INSPECT_GOOD
    assert InspectResult.from_json(json.loads(INSPECT_FULL)) == full_inspect()
    assert InspectResult.from_json(json.loads(INSPECT_GOOD)) == good
    # an answer from before the "ek" field reads as one without EKs
    older = json.loads(INSPECT_GOOD)
    del older["ek"]
    assert InspectResult.from_json(older) == good
    # and one from before "libtpms_version" as one that does not name its libtpms
    del older["libtpms_version"]
    assert InspectResult.from_json(older) == good
