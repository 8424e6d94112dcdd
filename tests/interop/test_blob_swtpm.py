"""Blob and key-file compatibility with the real swtpm, in both directions.

Every case moves TPM state between swtpm and vtpmctl.store and proves it arrived by
reading an NV index back with tpm2-tools, or by byte equality with what swtpm itself
returns over the control channel at the same moment.
"""

from __future__ import annotations

import re
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from swtpm_peer import SwtpmPeer, SwtpmPeerError, swtpm_socket

from vtpmctl.store.blob import (
    AesKey,
    BlobError,
    parse_header,
    unwrap_file,
    unwrap_transfer,
    wrap_file,
    wrap_transfer,
)
from vtpmctl.store.keys import encode_hex_key, load_key, write_secret_file

NV_INDEX = "0x1500016"
NV_SIZE = 32
DATA = b"vtpmctl-blob-interop-0123456789a"
PERMALL = "tpm2-00.permall"
CMD_STOP = 0x0E
CMD_GET_STATEBLOB = 0x0C
CMD_SET_STATEBLOB = 0x0D
BLOB_PERMANENT = 1

assert len(DATA) == NV_SIZE


def nv_write(tpm: SwtpmPeer, data: bytes, tmp: Path) -> None:
    src = tmp / f"nv-{secrets.token_hex(4)}"
    src.write_bytes(data)
    tpm.tpm2("nvwrite", NV_INDEX, "-C", "o", "-i", str(src))


def nv_read(tpm: SwtpmPeer) -> bytes:
    return tpm.tpm2("nvread", NV_INDEX, "-C", "o", "-s", str(NV_SIZE)).stdout


def startup_after_load(tpm: SwtpmPeer) -> None:
    """CMD_INIT makes a loaded blob live; a TPM 2 then needs TPM2_Startup (observed)."""
    tpm.reinit()
    tpm.tpm2("startup", "-c")


def state_dir_with(tmp: Path, name: str, permall: bytes) -> Path:
    state = tmp / name
    state.mkdir()
    (state / PERMALL).write_bytes(permall)
    return state


@dataclass(frozen=True)
class Source:
    plain: bytes  # libtpms permanent state with DATA in the NV index
    saved_blob: bytes  # swtpm_ioctl --save permanent, no keys
    permall_at_save: bytes  # tpm2-00.permall read right after that save


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    tmp = tmp_path_factory.mktemp("source")
    with swtpm_socket(tmp / "state") as tpm:
        tpm.tpm2("nvdefine", NV_INDEX, "-C", "o", "-s", str(NV_SIZE), "-a",
                 "ownerread|ownerwrite")  # fmt: skip
        nv_write(tpm, DATA, tmp)
        tpm.ioctl("--save", "permanent", str(tmp / "perm.blob"))
        permall_at_save = (tmp / "state" / PERMALL).read_bytes()
        tpm.shutdown()
    plain = unwrap_file((tmp / "state" / PERMALL).read_bytes(), None)
    return Source(plain, (tmp / "perm.blob").read_bytes(), permall_at_save)


# --- unencrypted files and blobs -------------------------------------------------------


def test_plain_file_and_saved_blob_match_ours_byte_for_byte(source: Source) -> None:
    plain = unwrap_file(source.permall_at_save, None)
    assert wrap_file(plain, None) == source.permall_at_save
    assert unwrap_transfer(source.saved_blob, state_flags=0, state_key=None,
                           migration_key=None) == plain  # fmt: skip
    ours, state_flags = wrap_transfer(
        plain, state_key=None, keep_state_encryption=False, migration_key=None
    )
    assert (ours, state_flags) == (source.saved_blob, 0)
    n = len(plain)
    # 0201000a 0004 <len> | 0004 <len> | 0001 <len> | raw
    assert ours == struct.pack(">BBHHIHIHI", 2, 1, 10, 0x04, n + 22, 4, n + 6, 1, n) + plain


def test_plain_file_written_by_us_opens_in_swtpm(source: Source, tmp_path: Path) -> None:
    state = state_dir_with(tmp_path, "st", wrap_file(source.plain, None))
    with swtpm_socket(state) as tpm:
        assert nv_read(tpm) == DATA


# --- state key (--key): files both ways ------------------------------------------------


@dataclass(frozen=True)
class KeyCase:
    name: str
    content: bytes  # the key or passphrase file as written to disk
    swtpm_opts: str  # --key value after "file=PATH," / "pwdfile=PATH,"
    load: Callable[[Path], AesKey]
    header_flags: int


_K256 = secrets.token_bytes(32)
_K128 = secrets.token_bytes(16)
KEY_CASES = [
    KeyCase("hex-256-0x-newline", b"0x" + _K256.hex().encode() + b"\n",
            "file={},mode=aes-256-cbc,format=hex", lambda p: load_key(p), 0x09),
    KeyCase("hex-128-bare", _K128.hex().encode(),
            "file={},mode=aes-cbc,format=hex", lambda p: load_key(p, kind="hex"), 0x01),
    KeyCase("binary-256", _K256, "file={},mode=aes-256-cbc,format=binary",
            lambda p: load_key(p, kind="binary", cipher="aes-256-cbc"), 0x09),
    KeyCase("pwd-pbkdf2-256", b"correct horse battery\n",
            "pwdfile={},mode=aes-256-cbc,kdf=pbkdf2",
            lambda p: load_key(p, kind="passphrase", kdf="pbkdf2"), 0x09),
    KeyCase("pwd-sha512-128", b"mypassword",
            "pwdfile={},mode=aes-128-cbc,kdf=sha512",
            lambda p: load_key(p, kind="passphrase", cipher="aes-128-cbc", kdf="sha512"), 0x01),
]  # fmt: skip


@pytest.mark.parametrize("case", KEY_CASES, ids=lambda c: c.name)
def test_encrypted_state_file_both_directions(
    case: KeyCase, source: Source, tmp_path: Path
) -> None:
    key_file = tmp_path / "key"
    write_secret_file(key_file, case.content)
    key = case.load(key_file)
    key_arg = ["--key", case.swtpm_opts.format(key_file)]

    # vtpmctl -> swtpm: our encrypted permall opens with swtpm's --key.
    ours = wrap_file(source.plain, key)
    assert parse_header(ours).flags == case.header_flags
    state = state_dir_with(tmp_path, "enc", ours)
    data2 = secrets.token_bytes(NV_SIZE)
    with swtpm_socket(state, extra_args=key_arg) as tpm:
        assert nv_read(tpm) == DATA
        # swtpm -> vtpmctl: make swtpm rewrite the file with its own encryption, then
        # compare our decryption with the plaintext swtpm hands out at the same moment.
        nv_write(tpm, data2, tmp_path)
        tpm.ioctl("--save", "permanent", str(tmp_path / "saved"))
        theirs = (state / PERMALL).read_bytes()
        assert theirs != ours
        assert parse_header(theirs).flags == case.header_flags
        saved = (tmp_path / "saved").read_bytes()
        assert unwrap_file(theirs, key) == unwrap_transfer(
            saved, state_flags=0, state_key=None, migration_key=None
        )
        tpm.shutdown()

    # ...and the state decrypted by us is the real thing: plain again, swtpm reads data2.
    plain2 = unwrap_file((state / PERMALL).read_bytes(), key)
    state2 = state_dir_with(tmp_path, "plain", wrap_file(plain2, None))
    with swtpm_socket(state2) as tpm:
        assert nv_read(tpm) == data2


def test_swtpm_refuses_our_file_with_another_key(source: Source, tmp_path: Path) -> None:
    """Guards the test above: a wrong key must really make swtpm fail."""
    key_file = tmp_path / "key"
    write_secret_file(key_file, secrets.token_hex(32).encode())
    state = state_dir_with(tmp_path, "enc", wrap_file(source.plain, AesKey(_K256)))
    # With not-need-init, swtpm loads the state at start and exits when it cannot.
    with (
        pytest.raises(SwtpmPeerError, match="HMAC failed"),
        swtpm_socket(state, extra_args=["--key", f"file={key_file},mode=aes-256-cbc"]),
    ):
        pass


# --- migration key (--migration-key): transfer blobs both ways -------------------------


@pytest.mark.parametrize(("bits", "mode", "flags"), [(256, "aes-256-cbc", 0x16),
                                                      (128, "aes-cbc", 0x06)])  # fmt: skip
def test_migration_blobs_both_directions(
    bits: int, mode: str, flags: int, source: Source, tmp_path: Path
) -> None:
    mkey = AesKey(secrets.token_bytes(bits // 8))
    mfile = tmp_path / "mkey"
    write_secret_file(mfile, encode_hex_key(mkey))
    mig_arg = ["--migration-key", f"file={mfile},mode={mode},format=hex"]

    # swtpm -> vtpmctl
    state = state_dir_with(tmp_path, "src", wrap_file(source.plain, None))
    with swtpm_socket(state, extra_args=mig_arg) as tpm:
        tpm.ioctl("--save", "permanent", str(tmp_path / "saved"))
        permall = (state / PERMALL).read_bytes()
        tpm.shutdown()
    saved = (tmp_path / "saved").read_bytes()
    assert parse_header(saved).flags == flags
    assert unwrap_transfer(saved, state_flags=0, state_key=None, migration_key=mkey) == (
        unwrap_file(permall, None)
    )
    with pytest.raises(BlobError) as missing:
        unwrap_transfer(saved, state_flags=0, state_key=None, migration_key=None)
    assert missing.value.rc == 0x0D

    # vtpmctl -> swtpm: into a brand-new TPM, which must then hold our NV data.
    blob, state_flags = wrap_transfer(
        source.plain, state_key=None, keep_state_encryption=False, migration_key=mkey
    )
    assert (parse_header(blob).flags, state_flags) == (flags, 0)
    (tmp_path / "ours").write_bytes(blob)
    with swtpm_socket(tmp_path / "dst", extra_args=mig_arg) as tpm:
        tpm.ioctl("--stop")
        tpm.ioctl("--load", "permanent", str(tmp_path / "ours"))
        startup_after_load(tpm)
        assert nv_read(tpm) == DATA


# --- raw control channel: state-key encrypted transfer blobs (swtpm_ioctl cannot) -----


def _recv_exact(sock_recv: Callable[[int], bytes], n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock_recv(n - len(out))
        if not chunk:
            raise EOFError(f"control channel closed after {len(out)} of {n} bytes")
        out += chunk
    return out


def ctrl_get_blob(tpm: SwtpmPeer, state_flags: int) -> tuple[int, int, bytes]:
    with tpm.ctrl.connect() as sock:
        sock.sendall(struct.pack(">IIII", CMD_GET_STATEBLOB, state_flags, BLOB_PERMANENT, 0))
        rc, flags, totlen, length = struct.unpack(">IIII", _recv_exact(sock.recv, 16))
        assert totlen == length
        return rc, flags, _recv_exact(sock.recv, length)


def ctrl_set_blob(tpm: SwtpmPeer, state_flags: int, blob: bytes) -> int:
    with tpm.ctrl.connect() as sock:
        sock.sendall(struct.pack(">I", CMD_STOP))
        assert _recv_exact(sock.recv, 4) == b"\0\0\0\0"
        header = struct.pack(">IIII", CMD_SET_STATEBLOB, state_flags, BLOB_PERMANENT, len(blob))
        sock.sendall(header + blob)
        rc: int = struct.unpack(">I", _recv_exact(sock.recv, 4))[0]
        return rc


def test_state_key_encrypted_transfer_blobs(source: Source, tmp_path: Path) -> None:
    key = AesKey(_K256)
    key_file = tmp_path / "key"
    write_secret_file(key_file, encode_hex_key(key))
    key_arg = ["--key", f"file={key_file},mode=aes-256-cbc,format=hex"]
    state = state_dir_with(tmp_path, "st", wrap_file(source.plain, key))
    with swtpm_socket(state, extra_args=key_arg) as tpm:
        # swtpm -> vtpmctl: GET without DECRYPTED keeps the state-key layer.
        rc, state_flags, blob = ctrl_get_blob(tpm, state_flags=0)
        assert (rc, state_flags, parse_header(blob).flags) == (0, 2, 0x0D)
        plain = unwrap_transfer(blob, state_flags=state_flags, state_key=key, migration_key=None)
        assert plain == unwrap_file((state / PERMALL).read_bytes(), key)

        # vtpmctl -> swtpm: the same shape, produced by us, loads back.
        ours, ours_flags = wrap_transfer(
            source.plain, state_key=key, keep_state_encryption=True, migration_key=None
        )
        assert (ours_flags, parse_header(ours).flags) == (2, 0x0D)
        assert ctrl_set_blob(tpm, ours_flags, ours) == 0
        startup_after_load(tpm)
        assert nv_read(tpm) == DATA


# --- SET_STATEBLOB errors: our result codes are swtpm's ------------------------------


def _set_header_field(blob: bytes, fmt: str, offset: int, value: int) -> bytes:
    out = bytearray(blob)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def test_set_stateblob_result_codes_match_swtpm(source: Source, tmp_path: Path) -> None:
    mkey = AesKey(secrets.token_bytes(32))
    mfile = tmp_path / "mkey"
    write_secret_file(mfile, encode_hex_key(mkey))
    good, _ = wrap_transfer(
        source.plain, state_key=None, keep_state_encryption=False, migration_key=mkey
    )
    mig128, _ = wrap_transfer(
        source.plain, state_key=None, keep_state_encryption=False,
        migration_key=AesKey(secrets.token_bytes(16)),
    )  # fmt: skip
    state_encrypted, _ = wrap_transfer(
        source.plain, state_key=AesKey(_K128), keep_state_encryption=True, migration_key=None
    )
    tampered = bytearray(good)
    tampered[40] ^= 0x01
    bad_blobs = {
        "raw permall file": source.permall_at_save,
        "truncated": good[:-1],
        "hdrsize 11": _set_header_field(good, ">H", 2, 11),
        "min_version 3": _set_header_field(good, ">B", 1, 3),
        "128-bit migration key": mig128,
        "tampered ciphertext": bytes(tampered),
        "state key not configured": state_encrypted,
    }
    expected = {
        "raw permall file": 0x09,
        "truncated": 0x03,
        "hdrsize 11": 0x2B,
        "min_version 3": 0x2E,
        "128-bit migration key": 0x28,
        "tampered ciphertext": 0x21,
        "state key not configured": 0x0D,
    }
    seen: dict[str, tuple[int, int]] = {}
    with swtpm_socket(extra_args=["--migration-key", f"file={mfile},mode=aes-256-cbc"]) as tpm:
        tpm.ioctl("--stop")
        for name, blob in bad_blobs.items():
            path = tmp_path / "bad"
            path.write_bytes(blob)
            result = tpm.ioctl("--load", "permanent", str(path), check=False)
            match = re.search(rb"PTM_SET_STATEBLOB: 0x([0-9a-f]+)", result.stderr)
            assert match, result.stderr
            with pytest.raises(BlobError) as ours:
                unwrap_transfer(blob, state_flags=0, state_key=None, migration_key=mkey)
            seen[name] = (int(match.group(1), 16), ours.value.rc)
        path.write_bytes(good)
        tpm.ioctl("--load", "permanent", str(path))
        startup_after_load(tpm)
        assert nv_read(tpm) == DATA
    assert seen == {name: (rc, rc) for name, rc in expected.items()}


# --- the helper itself, on the other transports other tests use --------------------


def test_peer_tcp_transport() -> None:
    with swtpm_socket(ctrl="tcp", data="tcp") as tpm:
        assert tpm.tcti.startswith("swtpm:host=")
        assert len(tpm.tpm2("getrandom", "8").stdout) == 8
        assert tpm.shutdown() == 0


def test_peer_tpm12_mixed_transport() -> None:
    with swtpm_socket(tpm2=False, ctrl="unix", data="tcp") as tpm:
        assert b"ptm capability is" in tpm.ioctl("-c").stdout
        assert tpm.shutdown() == 0
    assert not tpm.running
