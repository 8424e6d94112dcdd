"""Keys as swtpm takes them (issue 11/12): every --key variant, from files and descriptors.

Each case has a real swtpm write a TPM with one ``--key`` variant (hex, binary,
passphrase with swtpm's default kdf and key size, kdf=sha512, AES-256), then opens
that state with ``vtpmctl serve`` taking the same key from an inherited descriptor,
changes the TPM, and has swtpm open vtpmctl's state again with its original option.
An NV index read back with tpm2-tools proves each step.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import VtpmServer
from swtpm_peer import SwtpmPeer, swtpm_socket

NV_INDEX = "0x1500017"
NV_SIZE = 16

KEY128 = secrets.token_bytes(16)
KEY256 = secrets.token_bytes(32)
PASSWORD = b"correct horse battery staple\n"  # a trailing newline is part of the passphrase

# id: (file content, swtpm's --key with {path}, vtpmctl's --key with {fd})
VARIANTS = {
    "hex128": (KEY128.hex().encode() + b"\n", "file={path}", "fd={fd}"),
    "hex256": (
        KEY256.hex().encode(),
        "file={path},mode=aes-256-cbc",
        "fd={fd},format=hex,mode=aes-256-cbc",
    ),
    "binary256": (
        KEY256,
        "file={path},format=binary,mode=aes-256-cbc",
        "fd={fd},format=binary",
    ),
    "pwd-default": (PASSWORD, "pwdfile={path}", "pwdfd={fd}"),
    "pwd-sha512": (PASSWORD, "pwdfile={path},kdf=sha512", "pwdfd={fd}"),
    "pwd-sha512-256": (
        PASSWORD,
        "pwdfile={path},kdf=sha512,mode=aes-256-cbc",
        "pwdfd={fd},kdf=sha512,mode=aes-256-cbc",
    ),
    "pwd-pbkdf2-256": (PASSWORD, "pwdfile={path},mode=aes-256-cbc", "pwdfd={fd}"),
}


def nv_write(tpm: SwtpmPeer | VtpmServer, data: bytes, tmp: Path) -> None:
    src = tmp / f"nv-{secrets.token_hex(4)}"
    src.write_bytes(data)
    tpm.tpm2("nvwrite", NV_INDEX, "-C", "o", "-i", str(src))


def nv_read(tpm: SwtpmPeer | VtpmServer) -> bytes:
    return tpm.tpm2("nvread", NV_INDEX, "-C", "o", "-s", str(NV_SIZE)).stdout


def key_pipe(content: bytes) -> int:
    """A descriptor to hand over, as libvirt does: the read end of a filled pipe."""
    r, w = os.pipe()
    os.write(w, content)
    os.close(w)
    return r


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_swtpm_state_opens_with_the_key_from_a_descriptor_and_back(
    tmp_path: Path, vtpm_server: Callable[..., VtpmServer], variant: str
) -> None:
    content, swtpm_spec, vtpm_spec = VARIANTS[variant]
    key_file = tmp_path / "key"
    key_file.write_bytes(content)
    key_file.chmod(0o600)
    state = tmp_path / "state"
    first, second = b"written-by-swtpm", b"written-by-vtpm!"

    with swtpm_socket(state, extra_args=["--key", swtpm_spec.format(path=key_file)]) as tpm:
        tpm.tpm2("nvdefine", NV_INDEX, "-C", "o", "-s", str(NV_SIZE), "-a", "ownerread|ownerwrite")
        nv_write(tpm, first, tmp_path)
        tpm.shutdown()
    assert (state / "tpm2-00.permall").read_bytes()[5] & 0x01  # encrypted at rest

    fd = key_pipe(content)
    try:
        server = vtpm_server(
            state,
            flags="not-need-init,startup-clear",
            extra_args=["--key", vtpm_spec.format(fd=fd)],
            pass_fds=(fd,),
        )
    finally:
        os.close(fd)
    assert nv_read(server) == first
    nv_write(server, second, tmp_path)
    server.ioctl("-s")
    assert server.wait_exit() == 0
    assert content not in server.log_text().encode()

    with swtpm_socket(state, extra_args=["--key", swtpm_spec.format(path=key_file)]) as tpm:
        assert nv_read(tpm) == second
        tpm.shutdown()


def _v1_encrypt(key: bytes, state: bytes) -> bytes:
    """Legacy (version 1) encryption, as old swtpm wrote files without a header."""
    import hashlib

    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    plain = hashlib.sha256(state).digest() + state
    pad = 16 - len(plain) % 16
    enc = Cipher(algorithms.AES(key), modes.CBC(bytes(16))).encryptor()
    return enc.update(plain + bytes([pad]) * pad) + enc.finalize()


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_state_files_without_a_header_open_in_both(
    tmp_path: Path, vtpm_server: Callable[..., VtpmServer], encrypted: bool
) -> None:
    """swtpm reads a file whose header does not validate as a bare payload; so does vtpmctl."""
    from vtpmctl.store.blob import AesKey, unwrap_file

    key_file = tmp_path / "key"
    key_file.write_bytes(KEY128.hex().encode())
    key_file.chmod(0o600)
    swtpm_key = ["--key", f"file={key_file}"] if encrypted else []
    state = tmp_path / "state"
    with swtpm_socket(state, extra_args=swtpm_key) as tpm:
        tpm.tpm2("nvdefine", NV_INDEX, "-C", "o", "-s", str(NV_SIZE), "-a", "ownerread|ownerwrite")
        nv_write(tpm, b"headerless-state", tmp_path)
        tpm.shutdown()
    permall = state / "tpm2-00.permall"
    key = AesKey(KEY128) if encrypted else None
    payload = unwrap_file(permall.read_bytes(), key)
    bare = _v1_encrypt(KEY128, payload) if encrypted else payload
    permall.write_bytes(bare)

    with swtpm_socket(state, extra_args=swtpm_key) as tpm:  # the reference reads it
        assert nv_read(tpm) == b"headerless-state"
        tpm.ioctl("--stop")  # and leaves the file as it was
    permall.write_bytes(bare)

    vtpm_key = ["--key-file", str(key_file)] if encrypted else []
    server = vtpm_server(state, flags="not-need-init,startup-clear", extra_args=vtpm_key)
    assert nv_read(server) == b"headerless-state"
    server.ioctl("-s")
    assert server.wait_exit() == 0
    with swtpm_socket(state, extra_args=swtpm_key) as tpm:  # written back with a header
        assert nv_read(tpm) == b"headerless-state"
        tpm.shutdown()


def test_instance_keys_from_descriptors_never_touch_disk_or_argv(tmp_path: Path) -> None:
    """create/start take --key/--migration-key on descriptors (stdin here); the daemon
    gets them on a pipe: no key file appears and no command line holds key bytes."""
    from instance_helpers import home_at

    with home_at(tmp_path / "h") as home:
        home.run(
            "create",
            "enc",
            "--no-ek",
            "--key",
            "pwdfd=0,kdf=sha512,mode=aes-256-cbc",
            input=PASSWORD,
        )
        inst = home.registry().get("enc")
        assert inst.config.encrypted and inst.meta.cipher == "aes-256-cbc"
        # The caller keeps a key it gave on a descriptor: no copy, start needs it again.
        assert not inst.paths.state_key.exists() and inst.meta.key_source == "descriptor"
        assert not [p for p in home.path.rglob("*") if "key" in p.name]
        failed = home.run("start", "enc", check=False)
        assert failed.returncode == 1 and "keeps no copy of its state key" in failed.stderr
        wrong = home.run("start", "enc", "--key", "pwdfd=0", input=b"not it", check=False)
        assert wrong.returncode == 1 and "not the key" in wrong.stderr
        before = set(home.path.rglob("*"))
        mkey = tmp_path / "migration.pass"
        mkey.write_bytes(PASSWORD)
        mkey.chmod(0o600)
        started = home.run(
            "start",
            "enc",
            "--key",
            "pwdfd=0,kdf=sha512",
            "--migration-key",
            f"pwdfile={mkey},mode=aes-256-cbc",
            input=PASSWORD,
        )
        assert "started enc" in started.stdout
        pid = inst.statedir().holder_pid()
        assert pid is not None
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert b"--key\0fd=" in cmdline and PASSWORD.strip() not in cmdline
        new = set(home.path.rglob("*")) - before
        assert not [p for p in new if "key" in p.name], new
        info = home.json("info", "enc")
        assert info["state_key"] is True and info["migration_key"] is True
        bad = home.run("restart", "enc", "--key", "pwdfd=0,kdf=md5", check=False)
        assert bad.returncode == 2 and home.status("enc")[0] == 0  # refused before the stop
        restarted = home.run("restart", "enc", "--key", "pwdfd=0", input=PASSWORD)
        assert "restarted enc" in restarted.stdout
        home.run("stop", "enc")
        # the commands that read the state take the key the same way
        failed = home.run("snapshot", "create", "enc", check=False)
        assert failed.returncode == 1 and "give it with --key" in failed.stderr
        key = ("--key", "pwdfd=0,kdf=sha512")
        home.run("snapshot", "create", "enc", *key, input=PASSWORD)
        assert '"ok": true' in home.run("verify", "enc", "--json", *key, input=PASSWORD).stdout
        home.run("migrate", "export", "enc", "-o", str(tmp_path / "b"), *key, input=PASSWORD)
        home.run("snapshot", "restore", "enc", "1", *key, input=PASSWORD)
        assert not [p for p in set(home.path.rglob("*")) - before if "key" in p.name]


@pytest.mark.parametrize(
    ("swtpm_spec", "vtpm_spec"),
    [
        ("pwdfile={path}", "pwdfd={fd}"),
        ("pwdfile={path},kdf=sha512,mode=aes-256-cbc", "pwdfd={fd},kdf=sha512,mode=aes-256-cbc"),
    ],
    ids=["pwd-default", "pwd-sha512-256"],
)
def test_migration_key_passphrase_blobs_move_both_ways(
    tmp_path: Path, vtpm_server: Callable[..., VtpmServer], swtpm_spec: str, vtpm_spec: str
) -> None:
    """A state blob swtpm wraps with a passphrase migration key loads into vtpmctl given the
    same passphrase on a descriptor, and vtpmctl's blob loads back into swtpm."""
    pwd = tmp_path / "mig.pass"
    pwd.write_bytes(PASSWORD)
    pwd.chmod(0o600)
    swtpm_mig = ["--migration-key", swtpm_spec.format(path=pwd)]
    blob = tmp_path / "perm.blob"
    with swtpm_socket(tmp_path / "src", extra_args=swtpm_mig) as tpm:
        tpm.tpm2("nvdefine", NV_INDEX, "-C", "o", "-s", str(NV_SIZE), "-a", "ownerread|ownerwrite")
        nv_write(tpm, b"migrated-by-pass", tmp_path)
        tpm.ioctl("--save", "permanent", str(blob))
        tpm.shutdown()
    assert blob.read_bytes()[5] & 0x02  # wrapped with the migration key

    fd = key_pipe(PASSWORD)
    try:
        server = vtpm_server(
            tmp_path / "dst",
            extra_args=["--migration-key", vtpm_spec.format(fd=fd)],
            pass_fds=(fd,),
        )
    finally:
        os.close(fd)
    server.ioctl("--load", "permanent", str(blob))
    server.ioctl("-i")
    server.tpm2("startup", "-c")
    assert nv_read(server) == b"migrated-by-pass"
    nv_write(server, b"and-back-again!!", tmp_path)
    back = tmp_path / "back.blob"
    server.ioctl("--save", "permanent", str(back))
    assert back.read_bytes()[5] & 0x02
    server.ioctl("-s")
    assert server.wait_exit() == 0

    with swtpm_socket(tmp_path / "again", flags=None, extra_args=swtpm_mig) as tpm:
        tpm.ioctl("--load", "permanent", str(back))
        tpm.ioctl("-i")
        tpm.tpm2("startup", "-c")
        assert nv_read(tpm) == b"and-back-again!!"
        tpm.shutdown()
