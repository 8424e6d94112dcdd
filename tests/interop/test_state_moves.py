"""TPM state moves between a real swtpm and our server, both ways.

What must survive a move: a persistent key (same name from tpm2_readpublic), an NV index
(same bytes) and, when the volatile state moves too, a loaded transient object. Moves are
done with state blobs (swtpm_ioctl --save/--load, or our ``vtpmctl state export/import``)
and by handing over the state directory itself, in clear and with a state key; the
migration key and the ``.lock`` rules are checked as well.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerStartError, launch_vtpm, stop_vtpm

PERSISTENT = "0x81000001"
NV_INDEX = "0x1500020"
STARTED = "not-need-init,startup-clear"
VTPMCTL = str(Path(sys.executable).with_name("vtpmctl"))
BLOB_TYPES = ("permanent", "volatile")


@dataclass(frozen=True)
class Expected:
    persistent_name: str
    nv: bytes
    transient: str  # handle of the loaded transient object
    transient_name: str


def name_of(server: Any, handle: str) -> str:
    out = server.tpm2("readpublic", "-c", handle).stdout.decode()
    match = re.search(r"^name:\s*([0-9a-f]+)\s*$", out, re.MULTILINE)
    assert match, out
    return match.group(1)


def transient_handles(server: Any) -> list[str]:
    out = server.tpm2("getcap", "handles-transient").stdout.decode()
    return re.findall(r"0x8[0-9a-fA-F]{7}", out)


def populate(server: Any, tmp: Path) -> Expected:
    """A persistent ECC primary, 32 bytes of NV, and a transient AES primary left loaded."""
    ctx = tmp / "p.ctx"
    server.tpm2("createprimary", "-C", "o", "-G", "ecc", "-c", str(ctx))
    server.tpm2("evictcontrol", "-C", "o", "-c", str(ctx), PERSISTENT)
    server.tpm2("flushcontext", "-t")
    nv = os.urandom(32)
    (tmp / "nv.bin").write_bytes(nv)
    server.tpm2("nvdefine", NV_INDEX, "-C", "o", "-s", "32", "-a", "ownerread|ownerwrite")
    server.tpm2("nvwrite", NV_INDEX, "-C", "o", "-i", str(tmp / "nv.bin"))
    server.tpm2("createprimary", "-C", "o", "-G", "aes", "-c", str(tmp / "t.ctx"))
    [handle] = transient_handles(server)
    return Expected(name_of(server, PERSISTENT), nv, handle, name_of(server, handle))


def verify(server: Any, expected: Expected, transient: bool) -> None:
    assert name_of(server, PERSISTENT) == expected.persistent_name
    assert server.tpm2("nvread", NV_INDEX, "-C", "o", "-s", "32").stdout == expected.nv
    if transient:
        assert transient_handles(server) == [expected.transient]
        assert name_of(server, expected.transient) == expected.transient_name


def is_ours(server: Any) -> bool:
    return hasattr(server, "pid_file")


def target_of(server: Any) -> str:
    ep = server.ctrl
    return f"unix:{ep.path}" if ep.kind == "unix" else f"tcp:127.0.0.1:{ep.port}"


def vtpmctl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([VTPMCTL, *args], capture_output=True, timeout=30)


def save_blobs(server: Any, out: Path, tool: str) -> dict[str, Path]:
    files = {}
    for kind in BLOB_TYPES:
        files[kind] = out / f"{kind}.blob"
        if tool == "vtpmctl" and is_ours(server):
            res = vtpmctl(
                "state", "export", target_of(server), "--type", kind, "-o", str(files[kind])
            )
            assert res.returncode == 0, res.stderr
        else:
            server.ioctl("--save", kind, str(files[kind]))
    return files


def load_blobs(server: Any, files: dict[str, Path], tool: str) -> None:
    """Stop, load permanent then volatile, INIT (which resumes the volatile state)."""
    server.ioctl("--stop")
    for kind in BLOB_TYPES:
        if tool == "vtpmctl" and is_ours(server):
            res = vtpmctl("state", "import", target_of(server), str(files[kind]), "--type", kind)
            assert res.returncode == 0, res.stderr
        else:
            server.ioctl("--load", kind, str(files[kind]))
    if tool == "vtpmctl" and is_ours(server):
        res = vtpmctl("ctl", target_of(server), "init")
        assert res.returncode == 0, res.stderr
    else:
        server.ioctl("-i")


# (source, target, tool used on our side)
BLOB_MOVES = [
    ("swtpm", "ours", "swtpm_ioctl"),
    ("ours", "swtpm", "swtpm_ioctl"),
    ("swtpm", "ours", "vtpmctl"),
    ("ours", "swtpm", "vtpmctl"),
    ("ours", "ours", "vtpmctl"),
]


@pytest.mark.parametrize(
    ("source", "target", "tool"),
    BLOB_MOVES,
    ids=[f"{s}-to-{t}-{tool}" for s, t, tool in BLOB_MOVES],
)
def test_blob_move(
    source: str,
    target: str,
    tool: str,
    tmp_path: Path,
    vtpm_server: Callable[..., Any],
    swtpm_server: Callable[..., Any],
) -> None:
    start = {"ours": vtpm_server, "swtpm": swtpm_server}
    src = start[source](flags=STARTED)
    dst = start[target](flags=None)
    expected = populate(src, tmp_path)
    files = save_blobs(src, tmp_path, tool)
    load_blobs(dst, files, tool)
    verify(dst, expected, transient=True)


@pytest.mark.parametrize(("source", "target"), [("ours", "swtpm"), ("swtpm", "ours")])
@pytest.mark.parametrize("keyed", [False, True], ids=["clear", "state-key"])
def test_state_dir_move(
    source: str,
    target: str,
    keyed: bool,
    tmp_path: Path,
    vtpm_server: Callable[..., Any],
    swtpm_server: Callable[..., Any],
    key_file: Path,
) -> None:
    """The directory one server wrote opens in the other (with the same state key)."""
    start = {"ours": vtpm_server, "swtpm": swtpm_server}
    key = key_file if keyed else None
    state = tmp_path / "state"
    src = start[source](state, flags=STARTED, key_file=key)
    expected = populate(src, tmp_path)
    src.ioctl("-v")  # the transient object travels in tpm2-00.volatilestate
    assert src.shutdown() == 0
    header = (state / "tpm2-00.permall").read_bytes()[:10]
    assert header[4:6] == (b"\x00\x09" if keyed else b"\x00\x00")  # encrypted, 256-bit key
    dst = start[target](state, flags="not-need-init", key_file=key)
    verify(dst, expected, transient=True)


@pytest.mark.parametrize("holder", ["ours", "swtpm"])
def test_lock_is_shared(
    holder: str, tmp_path: Path, vtpm_server: Callable[..., Any], swtpm_server: Callable[..., Any]
) -> None:
    """While one server holds the dir's .lock, the other cannot use it; afterwards it can."""
    state = tmp_path / "state"
    if holder == "ours":
        first = vtpm_server(state, flags=STARTED)
        other = swtpm_server(state, flags=None)  # swtpm 0.7.1 locks at INIT
        res = other.ioctl("-i", check=False)
        assert res.returncode == 1 and b"0x9" in res.stderr
        assert first.shutdown() == 0
        other.ioctl("-i")
        assert len(other.tpm2("getrandom", "--hex", "8", check=False).stdout) in (0, 16)
    else:
        first = swtpm_server(state, flags=STARTED)
        with pytest.raises(ServerStartError, match="lock"):
            stop_vtpm(launch_vtpm(state))
        assert first.shutdown() == 0
        again = vtpm_server(state, flags=STARTED)
        assert len(again.tpm2("getrandom", "8").stdout) == 8


@pytest.mark.parametrize(("source", "target"), [("ours", "swtpm"), ("swtpm", "ours")])
def test_migration_key(
    source: str,
    target: str,
    tmp_path: Path,
    vtpm_server: Callable[..., Any],
    swtpm_server: Callable[..., Any],
    key_file: Path,
    other_key_file: Path,
) -> None:
    """Blobs leave encrypted with the migration key; only a peer with that key loads them."""
    start = {"ours": vtpm_server, "swtpm": swtpm_server}
    src = start[source](flags=STARTED, migration_key_file=key_file)
    expected = populate(src, tmp_path)
    files = save_blobs(src, tmp_path, "swtpm_ioctl")
    for blob in files.values():
        flags = int.from_bytes(blob.read_bytes()[4:6], "big")
        assert flags == 0x16  # migration data, migration-encrypted, 256-bit key

    without = start[target](flags=None)
    without.ioctl("--stop")
    res = without.ioctl("--load", "permanent", str(files["permanent"]), check=False)
    assert res.returncode == 1 and b"0xd" in res.stderr  # TPM_KEYNOTFOUND

    wrong = start[target](flags=None, migration_key_file=other_key_file)
    wrong.ioctl("--stop")
    res = wrong.ioctl("--load", "permanent", str(files["permanent"]), check=False)
    assert res.returncode == 1 and b"0x21" in res.stderr  # TPM_DECRYPT_ERROR

    right = start[target](flags=None, migration_key_file=key_file)
    load_blobs(right, files, "swtpm_ioctl")
    verify(right, expected, transient=True)


@pytest.mark.parametrize("target", ["ours", "swtpm"])
def test_plain_blob_into_migration_keyed_target(
    target: str,
    tmp_path: Path,
    vtpm_server: Callable[..., Any],
    swtpm_server: Callable[..., Any],
    key_file: Path,
) -> None:
    """A clear blob still loads where a migration key is configured (the upgrade path)."""
    start = {"ours": vtpm_server, "swtpm": swtpm_server}
    src = start["swtpm" if target == "ours" else "ours"](flags=STARTED)
    expected = populate(src, tmp_path)
    files = save_blobs(src, tmp_path, "swtpm_ioctl")
    dst = start[target](flags=None, migration_key_file=key_file)
    load_blobs(dst, files, "swtpm_ioctl")
    verify(dst, expected, transient=True)


@pytest.mark.parametrize("source", ["ours", "swtpm"])
def test_state_key_encrypted_blob(
    source: str,
    tmp_path: Path,
    vtpm_server: Callable[..., Any],
    swtpm_server: Callable[..., Any],
    key_file: Path,
) -> None:
    """Files under a state key; --save (DECRYPTED) blobs are clear and load anywhere."""
    start = {"ours": vtpm_server, "swtpm": swtpm_server}
    src = start[source](flags=STARTED, key_file=key_file)
    expected = populate(src, tmp_path)
    files = save_blobs(src, tmp_path, "swtpm_ioctl")
    assert int.from_bytes(files["permanent"].read_bytes()[4:6], "big") == 0x04
    for target in ("ours", "swtpm"):
        dst = start[target](flags=None)
        load_blobs(dst, files, "swtpm_ioctl")
        verify(dst, expected, transient=True)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return _hex_key(tmp_path / "key.hex", "2b" * 32)


@pytest.fixture
def other_key_file(tmp_path: Path) -> Path:
    return _hex_key(tmp_path / "other.hex", "7e" * 32)


def _hex_key(path: Path, hexdigits: str) -> Path:
    path.write_text(hexdigits + "\n")
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("server_kind", ["ours", "swtpm"])
@pytest.mark.parametrize(
    ("written_with", "opened_with"),
    [("key", "other"), ("key", None), (None, "key")],
    ids=["wrong-key", "no-key", "key-on-clear"],
)
def test_state_key_mismatch_fails_init(
    server_kind: str,
    written_with: str | None,
    opened_with: str | None,
    tmp_path: Path,
    vtpm_server: Callable[..., Any],
    swtpm_server: Callable[..., Any],
    key_file: Path,
    other_key_file: Path,
) -> None:
    """A dir opened with the wrong state key (or none) fails INIT with 0x101, files intact."""
    keys = {"key": key_file, "other": other_key_file, None: None}
    state = tmp_path / "state"
    writer = vtpm_server(state, flags=STARTED, key_file=keys[written_with])
    writer.ioctl("-v")
    assert writer.shutdown() == 0
    before = {p.name: p.read_bytes() for p in state.iterdir() if p.name != ".lock"}
    start = {"ours": vtpm_server, "swtpm": swtpm_server}[server_kind]
    server = start(state, flags=None, key_file=keys[opened_with])
    res = server.ioctl("-i", check=False)
    assert (res.returncode, res.stderr) == (1, b"TPM result from PTM_INIT: 0x101\n")
    server.ioctl("-s", check=False)
    after = {p.name: p.read_bytes() for p in state.iterdir() if p.name != ".lock"}
    assert after == before
