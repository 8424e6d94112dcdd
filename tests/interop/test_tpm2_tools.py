"""tpm2-tools 5.4 through the tss2 swtpm TCTI (``-T swtpm:path=DATA``) against our server.

The TCTI finds the control channel at ``DATA.ctrl`` (unix) or data port + 1 (TCP), which is
how the fixtures lay the sockets out.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

TRANSPORTS = ["unix", "tcp"]
NV_INDEX = "0x1500016"
PERSISTENT = "0x81000001"


def pcr_value(server: Any, pcr: int, bank: str = "sha256") -> bytes:
    out = server.tpm2("pcrread", f"{bank}:{pcr}").stdout.decode()
    match = re.search(rf"^\s*{pcr}\s*:\s*0x([0-9A-Fa-f]+)\s*$", out, re.MULTILINE)
    assert match, out
    return bytes.fromhex(match.group(1))


def object_name(server: Any, handle: str) -> str:
    out = server.tpm2("readpublic", "-c", handle).stdout.decode()
    match = re.search(r"^name:\s*([0-9a-f]+)\s*$", out, re.MULTILINE)
    assert match, out
    return match.group(1)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_startup_and_getrandom(transport: str, vtpm_server: Callable[..., Any]) -> None:
    """CMD_INIT over the control channel, then TPM2_Startup and GetRandom via the TCTI."""
    server = vtpm_server(ctrl=transport, data=transport)
    before = server.tpm2("getrandom", "8", "--hex", check=False)
    assert before.returncode != 0 and b"0x101" in before.stderr  # not initialised: failure
    server.ioctl("-i")
    server.tpm2("startup", "-c")
    randoms = {server.tpm2("getrandom", "16", "--hex").stdout for _ in range(3)}
    assert len(randoms) == 3
    assert all(re.fullmatch(rb"[0-9a-f]{32}", r) for r in randoms)


def test_flags_startup_clear_needs_no_init(vtpm_server: Callable[..., Any]) -> None:
    server = vtpm_server(flags="not-need-init,startup-clear")
    assert len(server.tpm2("getrandom", "32").stdout) == 32


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_keys_nv_and_pcrs_survive_a_restart(
    transport: str, tmp_path: Path, vtpm_server: Callable[..., Any]
) -> None:
    """createprimary + evictcontrol, nvdefine/nvwrite/nvread, pcrextend; then a new
    process on the same state dir still has the key (same name) and the NV bytes."""
    state = tmp_path / "state"
    server = vtpm_server(state, ctrl=transport, data=transport, flags="not-need-init,startup-clear")
    ctx = tmp_path / "primary.ctx"
    server.tpm2("createprimary", "-C", "o", "-g", "sha256", "-G", "ecc", "-c", str(ctx))
    server.tpm2("evictcontrol", "-C", "o", "-c", str(ctx), PERSISTENT)
    name = object_name(server, PERSISTENT)

    payload = bytes(range(32))
    (tmp_path / "nv.in").write_bytes(payload)
    server.tpm2("nvdefine", NV_INDEX, "-C", "o", "-s", "32", "-a", "ownerread|ownerwrite")
    server.tpm2("nvwrite", NV_INDEX, "-C", "o", "-i", str(tmp_path / "nv.in"))
    assert server.tpm2("nvread", NV_INDEX, "-C", "o", "-s", "32").stdout == payload

    assert pcr_value(server, 16) == bytes(32)
    digest = hashlib.sha256(b"measured").hexdigest()
    server.tpm2("pcrextend", f"16:sha256={digest}")
    expected = hashlib.sha256(bytes(32) + bytes.fromhex(digest)).digest()
    assert pcr_value(server, 16) == expected
    assert pcr_value(server, 16, "sha1") == bytes(20)  # other bank untouched

    assert server.shutdown() == 0
    again = vtpm_server(state, ctrl=transport, data=transport, flags="not-need-init,startup-clear")
    assert object_name(again, PERSISTENT) == name
    assert again.tpm2("nvread", NV_INDEX, "-C", "o", "-s", "32").stdout == payload
    assert PERSISTENT in again.tpm2("getcap", "handles-persistent").stdout.decode()
    assert pcr_value(again, 16) == bytes(32)  # Startup(CLEAR) reset the PCRs


def test_volatile_state_keeps_pcrs_across_init(
    tmp_path: Path, vtpm_server: Callable[..., Any]
) -> None:
    """STORE_VOLATILE, new process, INIT: the PCR extended before is still extended."""
    state = tmp_path / "state"
    server = vtpm_server(state)
    server.ioctl("-i")
    server.tpm2("startup", "-c")
    server.tpm2("pcrextend", f"16:sha256={'ab' * 32}")
    extended = pcr_value(server, 16)
    server.ioctl("-v")
    server.terminate()
    again = vtpm_server(state)
    again.ioctl("-i")
    assert pcr_value(again, 16) == extended


# Read-only queries whose output depends only on libtpms: identical to swtpm's.
DETERMINISTIC = [
    ("getcap", "properties-fixed"),
    ("getcap", "algorithms"),
    ("getcap", "commands"),
    ("getcap", "pcrs"),
    ("getcap", "ecc-curves"),
    ("pcrread",),
    ("getcap", "handles-persistent"),
]


def test_deterministic_outputs_match_swtpm(
    vtpm_server: Callable[..., Any],
    swtpm_server: Callable[..., Any],
    manufactured: Callable[[bool, Path], Path],
    tmp_path: Path,
) -> None:
    ours = vtpm_server(manufactured(True, tmp_path / "ours"), flags="not-need-init,startup-clear")
    peer = swtpm_server(manufactured(True, tmp_path / "swtpm"), flags="not-need-init,startup-clear")
    for args in DETERMINISTIC:
        mine, theirs = ours.tpm2(*args, check=False), peer.tpm2(*args, check=False)
        assert (mine.returncode, mine.stdout) == (theirs.returncode, theirs.stdout), args
