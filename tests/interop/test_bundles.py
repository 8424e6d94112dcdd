"""Migration bundles end to end: ``vtpmctl migrate export|import`` between two stores.

The source store is made once per module: ``src`` (EKs, no migration key) and ``srck``
(EKs and a migration key), each with an NV index holding a marker. Every test imports
into a fresh, empty store of its own and checks what matters after a move: the EKs keep
their Names, NV keeps its bytes, and any refused bundle leaves the target store exactly as
it was (every file and directory, byte for byte).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from instance_helpers import VTPMCTL, DataClient, Home, home_at, nv_define, nv_read, nv_write_cmd
from instance_helpers import rc as tpm_rc

from vtpmctl.engine import tpm2 as t
from vtpmctl.store.blob import AesKey, unwrap_transfer, wrap_transfer
from vtpmctl.store.bundle import BundleError, canonical_json, manifest_sum, read_tar, write_tar
from vtpmctl.usecases.migrate import ImportOptions, MigrateError, import_bundle

EK_HANDLES = (0x81010001, 0x81010016)
MARKER = b"bundle-marker-0123456789abcdef!!"  # 32 bytes
MARKER_K = b"keyed-bundle-marker-0123456789!!"
MKEY = hashlib.sha256(b"migration key of srck").digest()
ORDER = [
    "manifest.json",
    "manifest.sum",
    "ek.json",
    "permanent.blob",
    "volatile.blob",
    "savestate.blob",
]


@dataclass
class Source:
    home: Home
    key_file: Path
    names: dict[str, dict[int, bytes]]  # instance -> EK handle -> Name
    plain: Path  # bundle of src
    keyed: Path  # bundle of srck (migration key)


def short_dir(prefix: str) -> Path:
    """Socket paths live under the store: keep it short."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def write_key(path: Path, material: bytes) -> Path:
    path.write_bytes(material.hex().encode() + b"\n")
    path.chmod(0o600)
    return path


def boot(home: Home, name: str) -> DataClient:
    """Start NAME, CMD_INIT and TPM2_Startup(CLEAR); returns a data connection."""
    home.run("start", name)
    home.run("ctl", name, "init")
    client = DataClient(home.registry().paths(name).data_socket)
    t.startup(client.transact)
    return client


def tpm_facts(home: Home, name: str, size: int = 32) -> tuple[dict[int, bytes], bytes]:
    """EK Names and the NV marker of a stopped instance (started and stopped here)."""
    with boot(home, name) as client:
        names = {h: t.read_public(client.transact, h).name for h in EK_HANDLES}
        marker = nv_read(client.transact, size)
    home.run("stop", name)
    return names, marker


def write_nv(home: Home, name: str, marker: bytes) -> dict[int, bytes]:
    with boot(home, name) as client:
        nv_define(client.transact, size=len(marker))
        assert tpm_rc(client.transact(nv_write_cmd(marker))) == 0
        names = {h: t.read_public(client.transact, h).name for h in EK_HANDLES}
    home.run("stop", name)
    return names


@pytest.fixture(scope="module")
def source() -> Iterator[Source]:
    base = short_dir("vbs-")
    with home_at(base / "h") as home:
        key_file = write_key(base / "mig.key", MKEY)
        home.run("create", "src")
        home.run("create", "srck", "--migration-key-file", str(key_file))
        names = {"src": write_nv(home, "src", MARKER), "srck": write_nv(home, "srck", MARKER_K)}
        plain, keyed = base / "src.bundle", base / "srck.bundle"
        home.run("migrate", "export", "src", "-o", str(plain))
        home.run("migrate", "export", "srck", "-o", str(keyed))
        yield Source(home, key_file, names, plain, keyed)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def target() -> Iterator[Home]:
    base = short_dir("vbt-")
    with home_at(base / "h") as home:
        yield home
    shutil.rmtree(base, ignore_errors=True)


def tree(path: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every file and directory under ``path``: mode and contents (None for a dir)."""
    out: dict[str, tuple[int, bytes | None]] = {}
    if not path.exists():
        return out
    for p in sorted(path.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(path))] = (st.st_mode, None if p.is_dir() else p.read_bytes())
    return out


def one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vtpmctl: ") and "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def manifest_of(bundle: bytes) -> dict[str, Any]:
    with tarfile.open(fileobj=io.BytesIO(bundle), mode="r:") as tf:
        member = tf.extractfile("manifest.json")
        assert member is not None
        data: dict[str, Any] = json.loads(member.read())
        return data


# ---------------------------------------------------------------- round trips


def test_round_trip_file(source: Source, target: Home) -> None:
    out = target.run("migrate", "import", str(source.plain)).stdout
    assert "imported src from src" in out
    assert [i["name"] for i in target.json("list")["instances"]] == ["src"]
    assert tpm_facts(target, "src") == (source.names["src"], MARKER)
    src_paths, dst_paths = source.home.registry().paths("src"), target.registry().paths("src")
    assert dst_paths.ek_file.read_bytes() == src_paths.ek_file.read_bytes()
    src_meta = json.loads(src_paths.meta_file.read_bytes())
    dst_meta = json.loads(dst_paths.meta_file.read_bytes())
    assert dst_meta["ek_fingerprints"] == src_meta["ek_fingerprints"]
    code, st = target.status("src")
    assert code == 3 and st["encrypted"] is False and st["migration_key"] is False
    m = manifest_of(source.plain.read_bytes())
    assert m["source_state"] == "stopped" and m["tpm_version"] == "2.0"
    assert m["libtpms_version"] == st["libtpms_version"]
    assert [b["type"] for b in m["blobs"]] == ["permanent"]
    assert set(m["ek_fingerprints"]) == {"rsa2048", "ecc-nist-p384"}


def test_round_trip_through_a_pipe(source: Source, target: Home) -> None:
    pipeline = (
        f"VTPMCTL_HOME={source.home.path} {VTPMCTL[0]} migrate export src - | "
        f"VTPMCTL_HOME={target.path} {VTPMCTL[0]} migrate import - --name copy"
    )
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", pipeline],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "imported copy from src" in done.stdout
    assert tpm_facts(target, "copy") == (source.names["src"], MARKER)


def test_migration_key(source: Source, target: Home, tmp_path: Path) -> None:
    bundle = source.keyed.read_bytes()
    m = manifest_of(bundle)
    assert m["migration_key"] is True and m["migration_key_cipher"] == "aes-256-cbc"
    assert all(b["encrypted"] for b in m["blobs"])
    assert MARKER_K not in bundle
    before = tree(target.path)

    r = target.run("migrate", "import", str(source.keyed), check=False)
    one_line_error(r, "encrypted with a migration key", "--migration-key-file")
    wrong = write_key(tmp_path / "wrong.key", hashlib.sha256(b"wrong").digest())
    r = target.run(
        "migrate", "import", str(source.keyed), "--migration-key-file", str(wrong), check=False
    )
    one_line_error(r, "wrong migration key", m["migration_key_fingerprint"])
    assert tree(target.path) == before

    target.run("migrate", "import", str(source.keyed), "--migration-key-file", str(source.key_file))
    assert tpm_facts(target, "srck") == (source.names["srck"], MARKER_K)
    paths = target.registry().paths("srck")
    assert paths.migration_key.read_bytes() == source.key_file.read_bytes()
    assert target.status("srck")[1]["migration_key"] is True


def test_encrypt_at_rest_on_import(source: Source, target: Home, tmp_path: Path) -> None:
    key = write_key(tmp_path / "state.key", hashlib.sha256(b"state").digest())
    target.run("migrate", "import", str(source.plain), "--key-file", str(key))
    permall = target.registry().paths("src").state_dir / "tpm2-00.permall"
    assert permall.read_bytes()[4:6] == b"\x00\x09"  # AES-256 state-key encrypted file
    assert tpm_facts(target, "src") == (source.names["src"], MARKER)
    # A second copy, encrypted with a generated key.
    import_bundle(
        target.registry(), source.plain.read_bytes(), ImportOptions(name="gen", encrypt=True)
    )
    st = target.status("gen")[1]
    assert st["encrypted"] is True
    assert (Path(st["state_dir"]) / "tpm2-00.permall").read_bytes()[4:6] == b"\x00\x09"


def test_name_clash_and_rename(source: Source, target: Home) -> None:
    data = source.plain.read_bytes()
    import_bundle(target.registry(), data, ImportOptions())
    before = tree(target.path)
    r = target.run("migrate", "import", str(source.plain), check=False)
    one_line_error(r, "exists already", "--name")
    assert tree(target.path) == before
    import_bundle(target.registry(), data, ImportOptions(name="other"))
    assert [i["name"] for i in target.json("list")["instances"]] == ["other", "src"]


def test_running_instance(source: Source, target: Home, tmp_path: Path) -> None:
    """Refused by default; --allow-running copies the permanent state over the control
    channel, and the import says the copy came from a running TPM."""
    home = source.home
    with boot(home, "src"):
        out = tmp_path / "live.bundle"
        r = home.run("migrate", "export", "src", "-o", str(out), check=False)
        one_line_error(r, "is running", "--allow-running")
        assert not out.exists()
        home.run("migrate", "export", "src", "-o", str(out), "--allow-running")
    home.run("stop", "src")
    m = manifest_of(out.read_bytes())
    assert m["source_state"] == "running" and [b["type"] for b in m["blobs"]] == ["permanent"]
    done = import_bundle(target.registry(), out.read_bytes(), ImportOptions())
    assert any("do not run both" in note for note in done.notes)
    assert tpm_facts(target, "src") == (source.names["src"], MARKER)


def test_blobs_load_into_swtpm(
    source: Source, swtpm_server: Callable[..., Any], tmp_path: Path
) -> None:
    """The blobs in a bundle are ``swtpm_ioctl --save`` files: a real swtpm loads them."""
    for bundle, mkey, name in (
        (source.plain, None, "src"),
        (source.keyed, source.key_file, "srck"),
    ):
        members = dict(read_tar(bundle.read_bytes()))
        blob = tmp_path / f"{name}.permanent"
        blob.write_bytes(members["permanent.blob"])
        peer = swtpm_server(tmp_path / f"sw-{name}", flags=None, migration_key_file=mkey)
        peer.ioctl("--load", "permanent", str(blob))
        peer.ioctl("-i")
        peer.tpm2("startup", "-c")
        for handle in EK_HANDLES:
            out = peer.tpm2("readpublic", "-c", hex(handle)).stdout.decode()
            assert f"name: {source.names[name][handle].hex()}" in out
        peer.shutdown()


# ---------------------------------------------------------------- damaged bundles


def sample_offsets(data: bytes) -> list[int]:
    """Every 97th byte, plus every 7th byte of each tar header and of the end blocks,
    and the bytes around every member boundary and in its padding."""
    offsets = set(range(0, len(data), 97))
    pos = 0
    for _, content in read_tar(data):
        offsets.update(range(pos, pos + 512, 7))
        offsets.update({pos + 124, pos + 135, pos + 148, pos + 155, pos + 156, pos + 257})
        end = pos + 512 + len(content)
        pad_end = end + (-len(content) % 512)
        offsets.update({pos + 512, end - 1, end, pad_end - 1})
        pos = pad_end
    offsets.update(range(pos, len(data), 7))
    offsets.add(len(data) - 1)
    return sorted(o for o in offsets if 0 <= o < len(data))


def refuse(target: Home, data: bytes, key: AesKey | None = None) -> str:
    """Import in this process; it must fail and change nothing. Returns the message."""
    before = tree(target.path)
    with pytest.raises((BundleError, MigrateError)) as info:
        import_bundle(target.registry(), data, ImportOptions(migration_key=key))
    assert tree(target.path) == before
    message = str(info.value)
    assert "\n" not in message and message
    return message


@pytest.mark.parametrize("which", ["plain", "keyed"])
def test_corruption_sweep(source: Source, target: Home, which: str) -> None:
    path = source.plain if which == "plain" else source.keyed
    key = AesKey(MKEY) if which == "keyed" else None
    data = path.read_bytes()
    offsets = sample_offsets(data)
    assert len(offsets) > 150
    for offset in offsets:
        damaged = bytearray(data)
        damaged[offset] ^= 0x01 if offset % 2 else 0x40
        message = refuse(target, bytes(damaged), key)
        assert "bundle" in message, (offset, message)


def test_corruption_via_cli_keeps_store(source: Source, target: Home, tmp_path: Path) -> None:
    data = source.plain.read_bytes()
    import_bundle(target.registry(), data, ImportOptions(name="keep"))
    members = read_tar(data)
    blob_at = data.index(dict(members)["permanent.blob"]) + 100
    for offset, needle in ((130, "corrupted"), (blob_at, "permanent.blob")):
        damaged = bytearray(data)
        damaged[offset] ^= 0x20
        path = tmp_path / f"bad-{offset}"
        path.write_bytes(bytes(damaged))
        before = tree(target.path)
        one_line_error(target.run("migrate", "import", str(path), check=False), needle)
        assert tree(target.path) == before


def test_truncation_sweep(source: Source, target: Home) -> None:
    data = source.keyed.read_bytes()
    sizes = set(range(0, len(data), 97)) | {len(data) - 1, len(data) - 512, len(data) - 1024}
    pos = 0
    for _, content in read_tar(data):
        sizes.update({pos, pos + 1, pos + 511, pos + 512, pos + 512 + len(content)})
        pos += 512 + len(content) + (-len(content) % 512)
    for size in sorted(s for s in sizes if 0 <= s < len(data)):
        refuse(target, data[:size], AesKey(MKEY))
    # and through a pipe, cut short
    cut = subprocess.run(
        [*VTPMCTL, "migrate", "import", "-"],
        input=data[: len(data) // 2],
        env=target.env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert cut.returncode == 1 and b"truncated" in cut.stderr, cut.stderr
    assert tree(target.path) == {}


# ---------------------------------------------------------------- lying manifests


def reforge(
    data: bytes,
    edit: Callable[[dict[str, Any]], None] | None = None,
    members: Callable[[dict[str, bytes]], None] | None = None,
    key: AesKey | None = None,
) -> bytes:
    """Alter the manifest or members and make every hash (and the MAC, with ``key``) agree."""
    content = dict(read_tar(data))
    if members is not None:
        members(content)
    manifest = json.loads(content["manifest.json"])
    for entry in [*manifest["blobs"], *manifest["files"]]:
        blob = content[entry["member"]]
        entry.update(size=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    if edit is not None:
        edit(manifest)
    text = canonical_json(manifest)
    content.update({"manifest.json": text, "manifest.sum": manifest_sum(text, key)})
    return write_tar([(n, content[n]) for n in ORDER if n in content])


def test_lying_manifests(source: Source, target: Home) -> None:
    plain = source.plain.read_bytes()
    keyed = source.keyed.read_bytes()
    k = AesKey(MKEY)
    keyed_members = dict(read_tar(keyed))
    other_state = unwrap_transfer(
        keyed_members["permanent.blob"], state_flags=0, state_key=None, migration_key=k
    )
    other_blob = wrap_transfer(
        other_state, state_key=None, keep_state_encryption=False, migration_key=None
    )[0]

    def swap_state(content: dict[str, bytes]) -> None:
        content["permanent.blob"] = other_blob

    def swap_ek(content: dict[str, bytes]) -> None:
        content["ek.json"] = keyed_members["ek.json"]

    def other_fps(m: dict[str, Any]) -> None:
        m["ek_fingerprints"] = manifest_of(keyed)["ek_fingerprints"]

    def garbage_state(content: dict[str, bytes]) -> None:
        content["permanent.blob"] = wrap_transfer(
            other_state[:200] + bytes(len(other_state) - 200),
            state_key=None,
            keep_state_encryption=False,
            migration_key=None,
        )[0]

    def nested_ek(content: dict[str, bytes]) -> None:
        content["ek.json"] = b"[" * 100_000 + b"]" * 100_000

    cases: list[tuple[str, bytes, AesKey | None, str]] = [
        # nested past the recursion limit: malformed JSON like any other
        ("ek-nested", reforge(plain, members=nested_ek), None, "ek.json"),
        # the state of another TPM, hashes made to agree: its EKs are not the listed ones
        ("other-state", reforge(plain, members=swap_state), None, "not the one in its TPM"),
        # another TPM's EK description, consistently: not the EKs in the state
        ("other-ek", reforge(plain, other_fps, members=swap_ek), None, "not the one in its TPM"),
        ("ek-fingerprints-only", reforge(plain, other_fps), None, "do not match its ek.json"),
        (
            "tpm-1.2",
            reforge(plain, lambda m: m.update(tpm_version="1.2")),
            None,
            "cannot load this TPM 1.2 state",
        ),
        ("garbage-state", reforge(plain, members=garbage_state), None, "cannot load"),
        (
            "wrong-hash",
            reforge(plain, lambda m: m["blobs"][0].update(sha256="ab" * 32)),
            None,
            "does not match the size and SHA-256",
        ),
        # re-hashed and re-MACed, but without the right key
        (
            "keyed-forged-mac",
            reforge(keyed, lambda m: m.update(source_host="elsewhere"), key=AesKey(bytes(32))),
            k,
            "fails authentication",
        ),
    ]
    for label, forged, key, needle in cases:
        message = refuse(target, forged, key)
        assert needle in message, (label, message)


def edit_ek(data: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    """Change the bundle's ek.json and make the manifest's EK fingerprints and every hash agree."""
    members = dict(read_tar(data))
    info = json.loads(members["ek.json"])
    change(info)
    text = json.dumps(info, indent=2).encode()
    fps = {e["algorithm"]: e["fingerprint_sha256"] for e in info["eks"] if isinstance(e, dict)}

    def put(content: dict[str, bytes]) -> None:
        content["ek.json"] = text

    return reforge(data, lambda m: m.update(ek_fingerprints=fps), members=put)


def test_ek_json_fields_are_checked_and_match_the_state(source: Source, target: Home) -> None:
    """Every field of ek.json is checked, and the certificates must be those in the TPM's NV."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    plain = source.plain.read_bytes()
    theirs = json.loads(dict(read_tar(source.keyed.read_bytes()))["ek.json"])
    ours = json.loads(dict(read_tar(plain))["ek.json"])
    assert all(e["certificate_pem"] for e in ours["eks"]) and ours["platform_certificate_pem"]
    other_key = ec.generate_private_key(ec.SECP384R1()).public_key()
    other_pem = other_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    other_fp = hashlib.sha256(
        other_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    ).hexdigest()

    def ek0(**fields: Any) -> Callable[[dict[str, Any]], None]:
        return lambda info: info["eks"][0].update(fields)

    cases: dict[str, Callable[[dict[str, Any]], None]] = {
        "certificate-garbage": ek0(certificate_pem="-----BEGIN CERTIFICATE-----\nxx\n"),
        "certificate-type": ek0(certificate_pem=5),
        "certificate-of-another-tpm": ek0(certificate_pem=theirs["eks"][0]["certificate_pem"]),
        "certificate-dropped": ek0(certificate_pem=None, cert_nv_index=None),
        "cert-index-type": ek0(cert_nv_index=5),
        "cert-index-other": ek0(cert_nv_index="0x01c0000a"),
        "handle-type": ek0(handle=0x81010001),
        "name-type": ek0(name=None),
        "public-key-of-another-key": ek0(public_key_pem=other_pem, fingerprint_sha256=other_fp),
        "platform-certificate-of-another-tpm": lambda i: i.update(
            platform_certificate_pem=theirs["platform_certificate_pem"]
        ),
        "platform-certificate-garbage": lambda i: i.update(platform_certificate_pem="x"),
        "locked-as-string": lambda i: i.update(locked="no"),
        "locked-flipped": lambda i: i.update(locked=not i["locked"]),
        "extra-key": lambda i: i.update(note="hi"),
        "eks-not-a-list": lambda i: i.update(eks={}),
        "ek-not-an-object": lambda i: i["eks"].append("rsa"),
        "duplicate-ek": lambda i: i["eks"].append(dict(i["eks"][0])),
    }
    for label, change in cases.items():
        message = refuse(target, edit_ek(plain, change))
        assert "ek.json" in message or "not the one in its TPM" in message, (label, message)
    # the unaltered ek.json, re-serialised, is fine and `ek export` reads it back
    fine = target.path.parent / "fine.bundle"
    fine.write_bytes(edit_ek(plain, lambda i: None))
    target.run("migrate", "import", str(fine))
    exported = target.json("ek", "export", "src")
    assert exported["eks"] == ours["eks"]
    assert exported["platform_certificate_pem"] == ours["platform_certificate_pem"]


def test_text_from_the_manifest_is_escaped(source: Source, target: Home, tmp_path: Path) -> None:
    """source_host and source_name come from the bundle: never raw control characters."""
    hostile = "h\x1b]0;pwned\x07\x1b[2J\u202e"
    forged = tmp_path / "hostile.bundle"
    forged.write_bytes(
        reforge(
            source.plain.read_bytes(),
            lambda m: m.update(source_host=hostile, source_name="n" + hostile),
        )
    )
    result = target.run("migrate", "import", str(forged), "--name", "fine")
    for stream in (result.stdout, result.stderr):
        assert not any(c in stream for c in "\x1b\x07\u202e"), stream
    assert "\\x1b]0;pwned\\x07" in result.stdout
    # without --name, the hostile source name is refused, escaped too
    refused = target.run("migrate", "import", str(forged), check=False)
    assert refused.returncode != 0
    assert not any(c in refused.stderr for c in "\x1b\x07\u202e"), refused.stderr
