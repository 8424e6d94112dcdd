"""Requests a CUSE TPM must refuse with the right error, while it keeps serving."""

from __future__ import annotations

import errno
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cuselib import (
    VTPMCTL,
    Served,
    ctl,
    ioctl_errno,
    needs_cuse,
    opened,
    rc_of,
    read_response,
    served_cuse,
    transact_fd,
)

from vtpmctl.device.protocol import CAPS_CUSE, TPM2_SHORT_WRITE_RESPONSE, Cmd, Res
from vtpmctl.engine import tpm2

pytestmark = needs_cuse

TPM_RC_CANCELED = 0x909
TPM_RC_SUCCESS = 0


@pytest.fixture(scope="module")
def dev(guest_tmp: Path) -> Iterator[Served]:
    # Through the command line: `vtpmctl serve --cuse` itself, ended by SIGTERM.
    with served_cuse("bad", guest_tmp / "state", cli=True) as served:
        with opened(str(served.device)) as fd:
            assert ctl(fd, Cmd.INIT, {"init_flags": 0})["result"] == 0
            assert rc_of(transact_fd(fd)(tpm2.build_startup())) == 0
        yield served


def _rsa_primary() -> bytes:
    """A command that runs for a while (RSA key generation) on the worker thread."""
    attrs = (
        tpm2.ObjAttr.FIXED_TPM
        | tpm2.ObjAttr.FIXED_PARENT
        | tpm2.ObjAttr.SENSITIVE_DATA_ORIGIN
        | tpm2.ObjAttr.USER_WITH_AUTH
        | tpm2.ObjAttr.RESTRICTED
        | tpm2.ObjAttr.DECRYPT
    )
    template = tpm2.Public(
        type=tpm2.Alg.RSA,
        name_alg=tpm2.Alg.SHA256,
        attributes=attrs,
        symmetric=tpm2.SymDef(tpm2.Alg.AES, 128, tpm2.Alg.CFB),
        key_bits=2048,
        unique=os.urandom(8),
    )
    return tpm2.build_create_primary(tpm2.RH_OWNER, template)


def _open_when_free(path: str, timeout: float = 120.0) -> int:
    """Open the device once the previous opener's release has been served."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _write_when_idle(fd: int, cmd: bytes, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            assert os.write(fd, cmd) == len(cmd)
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_one_opener_at_a_time(dev: Served) -> None:
    with opened(str(dev.device)):
        with pytest.raises(OSError) as info:
            os.open(str(dev.device), os.O_RDWR)
        assert info.value.errno == errno.EBUSY
        busy = dev.swtpm_ioctl("-c", check=False)
        assert busy.returncode != 0
    assert dev.swtpm_ioctl("-c").stdout.strip() == "ptm capability is 0x16fff"


def test_unknown_and_malformed_ioctls(dev: Served) -> None:
    with opened(str(dev.device)) as fd:
        assert ioctl_errno(fd, 0xC0045099) == errno.ENOTTY  # no such PTM ioctl
        assert ioctl_errno(fd, 0x80085100) == errno.ENOTTY  # another driver's magic
        assert ioctl_errno(fd, 0x8004500F) == errno.ENOTTY  # SET_DATAFD: sockets only
        assert not os.isatty(fd)  # TCGETS: ENOTTY
        assert ioctl_errno(fd, 0xC0025001) == errno.EINVAL  # PTM_INIT, 2-byte buffer
        assert ioctl_errno(fd, 0xCC0C5011) == errno.EINVAL  # GET_INFO, i386 layout
        assert ioctl_errno(fd, 0x0000500D) == errno.EINVAL  # PTM_STOP without its result
        assert ctl(fd, Cmd.SET_LOCALITY, {"loc": 5})["result"] == 0x3D  # TPM_BAD_LOCALITY
        assert ctl(fd, Cmd.RESET_TPMESTABLISHED, {"loc": 9})["result"] == 0x3D
        assert ctl(fd, Cmd.HASH_DATA, {"length": 5000})["result"] == Res.FAIL
        assert (
            ctl(fd, Cmd.SET_STATEBLOB, {"type": 1, "length": 10})["result"] == Res.BAD_ORDINAL
        )  # running
        assert ctl(fd, Cmd.GET_STATEBLOB, {"type": 7})["result"] == Res.BAD_PARAMETER
        assert ctl(fd, Cmd.GET_CAPABILITY) == {"caps": CAPS_CUSE}


def test_reads_and_writes_out_of_turn(dev: Served) -> None:
    with opened(str(dev.device), os.O_RDWR | os.O_NONBLOCK) as fd:
        with pytest.raises(BlockingIOError):
            os.read(fd, 4096)  # nothing pending: EAGAIN
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        assert poller.poll(0) == []
    with opened(str(dev.device)) as fd:
        assert os.read(fd, 4096) == b""  # nothing written: end of file, not a hang
        # Shorter than a TPM header: TPM_RC_INSUFFICIENT.
        assert os.write(fd, b"\x80\x01\x00") == 3
        assert read_response(fd) == TPM2_SHORT_WRITE_RESPONSE
        # Larger than the TPM's buffer: truncated, and the TPM says the size is wrong.
        for size in (5000, 8192, 200_000):
            big = b"\x80\x01" + size.to_bytes(4, "big") + b"\0\0\x01\x7b" + b"\0" * (size - 10)
            assert os.write(fd, big) == size
            resp = read_response(fd)
            assert resp[:2] == b"\x80\x01" and rc_of(resp) != 0, (size, resp.hex())
        # Partial reads walk through one response.
        assert os.write(fd, tpm2.build_get_random(16)) == 12
        head = os.read(fd, 4)
        rest = os.read(fd, 4096)
        assert len(head) == 4 and len(head + rest) == int.from_bytes((head + rest)[2:6], "big")
        assert rc_of(head + rest) == 0
        assert os.read(fd, 4096) == b""


def test_busy_while_a_key_is_generated_and_cancel(dev: Served) -> None:
    codes = []
    with opened(str(dev.device)) as fd:
        for _ in range(3):
            assert os.write(fd, _rsa_primary()) > 0
            with pytest.raises(OSError) as info:
                os.write(fd, tpm2.build_get_random(8))
            assert info.value.errno == errno.EBUSY
            assert ctl(fd, Cmd.GET_CAPABILITY) == {"caps": CAPS_CUSE}  # answered meanwhile
            assert ctl(fd, Cmd.CANCEL_TPM_CMD)["result"] == 0
            resp = read_response(fd)
            codes.append(rc_of(resp))
            if codes[-1] == TPM_RC_SUCCESS:
                handle = tpm2.parse_create_primary(resp).handle
                tpm2.flush_context(transact_fd(fd), handle)
            else:
                break
        # An ioctl that needs the TPM waits for the command, then runs.
        assert ctl(fd, Cmd.GET_TPMESTABLISHED)["result"] == 0
    assert codes[-1] == TPM_RC_CANCELED, codes


_VICTIM = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
os.write(fd, bytes.fromhex(sys.argv[2]))
print("sent", flush=True)
os.read(fd, 4096)
print("answered", flush=True)
import time
time.sleep(3600)  # if key generation beat the kill, the kill still ends us, never exit 0
"""


def test_client_killed_mid_command(dev: Served) -> None:
    victim = subprocess.Popen(
        [sys.executable, "-c", _VICTIM, str(dev.device), _rsa_primary().hex()],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert victim.stdout is not None
        assert victim.stdout.readline().strip() == "sent"
        time.sleep(0.5)  # now blocked in read() while the key is generated
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(120) == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    fd = _open_when_free(str(dev.device))
    try:
        ctl(fd, Cmd.CANCEL_TPM_CMD)  # cut the orphaned key generation short
        _write_when_idle(fd, tpm2.build_get_random(8))
        assert rc_of(read_response(fd)) == 0
    finally:
        os.close(fd)


def test_a_name_in_use_is_refused(dev: Served, guest_tmp: Path) -> None:
    other = guest_tmp / "other"
    other.mkdir()
    result = subprocess.run(
        [VTPMCTL, "serve", "--state", str(other), "--cuse", "vtpm-bad"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "/dev/vtpm-bad exists already" in result.stderr, result.stderr


def test_still_serving(dev: Served) -> None:
    assert dev.running
    assert dev.swtpm_ioctl("-c").stdout.strip() == "ptm capability is 0x16fff"
    assert len(dev.tpm2("getrandom", "--hex", "8").stdout.strip()) == 16
