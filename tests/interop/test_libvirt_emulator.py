"""libvirt 9.0's ``<backend type='emulator'>`` on vtpmctl's swtpm, swtpm_setup and swtpm_ioctl.

The launchers are first in libvirtd's PATH, so libvirt manufactures the TPM with
vtpmctl's swtpm_setup (EK certificates from swtpm_localca, as /etc/swtpm_setup.conf
says) and runs vtpmctl's swtpm as ``tss``. One diskless OVMF domain per variant (with and
without ``<encryption secret=…>``) goes through start (manufacture), destroy, start,
save, restore, managedsave + start; the firmware is waited for once. Meanwhile
``vtpmctl list`` shows the running vTPM as libvirt's and can read its PCRs; afterwards
a real swtpm opens the state (with the secret as its passphrase) and finds the EKs and
their certificates. A third domain has a ``version='1.2'`` TPM (tpm-tis): manufactured
by vtpmctl's swtpm_setup without --tpm2, started twice, its EK read back by a real swtpm.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from compat_bin import install
from instance_helpers import VTPMCTL
from libvirt_harness import Libvirt, libvirt_session, unavailable
from rawsock import tpm_transact
from swtpm_peer import swtpm_socket

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))

SWTPM_STATE = Path("/var/lib/libvirt/swtpm")
SWTPM_LOG = Path("/var/log/swtpm/libvirt/qemu")
LOCALCA = Path("/var/lib/swtpm-localca")
EK_CERTS = ("0x1c00002", "0x1c08000", "0x1c00016")
SECRET = b"the domain's TPM passphrase"


@pytest.fixture(scope="module")
def launchers() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="vtpmctl-compat-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        yield install(base / "bin", for_others=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def localca_for_tss() -> None:
    """swtpm_localca runs as tss under libvirt; files a root run left must be tss's,
    as the swtpm package intends (else the real swtpm fails there too)."""
    tss = pwd.getpwnam("tss")
    for path in (LOCALCA, *LOCALCA.iterdir()):
        if path.stat().st_uid != tss.pw_uid:
            os.chown(path, tss.pw_uid, -1)


def secret(lv: Libvirt) -> str:
    ident = str(uuid.uuid4())
    xml = lv.work_dir / "secret.xml"
    xml.write_text(
        f"<secret ephemeral='no' private='yes'><uuid>{ident}</uuid>"
        f"<usage type='vtpm'><name>vtpmctl test {ident}</name></usage></secret>"
    )
    lv.virsh("secret-define", str(xml))
    value = lv.work_dir / "secret.value"
    value.write_bytes(SECRET)
    lv.virsh("secret-set-value", ident, "--file", str(value), "--plain")
    return ident


def vtpmctl(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, VTPMCTL_HOME=str(home), VTPMCTL_ATTACHED="1")
    return subprocess.run([*VTPMCTL, *args], env=env, capture_output=True, text=True, timeout=60)


def state_of(lv: Libvirt, name: str, family: str = "tpm2") -> Path:
    ident = lv.virsh("domuuid", name).stdout.strip()
    return SWTPM_STATE / ident / family


def test_libvirt_runs_vtpmctl_as_swtpm(launchers: Path, tmp_path: Path) -> None:
    localca_for_tss()
    work = Path(tempfile.mkdtemp(prefix="lvc-", dir="/tmp"))
    home = tmp_path / "home"
    try:
        with libvirt_session(work, path_prefix=launchers) as lv:
            ident = secret(lv)
            try:
                run_variants(lv, ident, work, home, tmp_path, launchers)
                run_tpm12(lv, home, tmp_path)
            finally:
                lv.virsh("secret-undefine", ident, check=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def read_while_running(home: Path, tmp_path: Path, name: str, encrypted: bool) -> None:
    """vtpmctl reads libvirt's running vTPM (an encrypted one with the secret as --key)."""
    key: list[str] = []
    if encrypted:
        res = vtpmctl(home, "snapshot", "create", name)
        assert res.returncode == 1 and "--key" in res.stderr, res.stderr
        pw = tmp_path / "running.pw"
        pw.write_bytes(SECRET)
        pw.chmod(0o600)
        key = ["--key", f"pwdfile={pw},mode=aes-256-cbc"]
    res = vtpmctl(home, "snapshot", "create", name, *key)  # QEMU holds the control channel
    assert res.returncode == 0, res.stderr
    assert json.loads(vtpmctl(home, "verify", name, "--json", *key).stdout)["ok"]
    eks = json.loads(vtpmctl(home, "ek", "export", name, "--json", *key).stdout)["eks"]
    assert {e["handle"] for e in eks} == {"0x81010001", "0x81010016"}, eks


def run_variants(
    lv: Libvirt, ident: str, work: Path, home: Path, tmp_path: Path, launchers: Path
) -> None:
    variants = {
        "plain": "<backend type='emulator' version='2.0'/>",
        "secret": "<backend type='emulator' version='2.0'>"
        f"<encryption secret='{ident}'/></backend>",
    }
    for variant, backend in variants.items():
        dom = lv.define(variant, f"<tpm model='tpm-crb'>{backend}</tpm>")
        dom.start()  # libvirt runs swtpm_setup, then swtpm
        dom.wait_firmware()
        listed = json.loads(vtpmctl(home, "list", "--json").stdout)["instances"]
        mine = [i for i in listed if i["name"] == f"libvirt-{dom.name}"]
        assert mine and mine[0]["owner"].startswith("libvirt ("), listed
        assert mine[0]["encrypted"] == (variant == "secret")
        cmdline = Path(f"/proc/{mine[0]['pid']}/cmdline").read_bytes().split(b"\0")
        assert str(launchers / "swtpm").encode() in cmdline, cmdline  # not /usr/bin/swtpm
        read_while_running(home, tmp_path, mine[0]["name"], variant == "secret")
        dom.destroy()
        dom.start()
        dom.save(work / f"{variant}.save")
        dom.restore(work / f"{variant}.save")
        dom.managedsave()
        dom.start()
        assert dom.state() == "running"
        state = state_of(lv, dom.name)
        dom.destroy()

        log = (SWTPM_LOG / f"{dom.name}-swtpm.log").read_text(errors="replace")
        assert "Successfully authored TPM state." in log
        assert "/usr/bin/swtpm " not in log and "/usr/bin/swtpm_setup" not in log

        copy = tmp_path / f"{variant}-state"
        shutil.copytree(state, copy)
        key_args = []
        if variant == "secret":
            pw = tmp_path / "pw"
            pw.write_bytes(SECRET)
            key_args = ["--key", f"pwdfile={pw},mode=aes-256-cbc"]
        # QEMU's exit made the vTPM save its state (TPM2_Shutdown(STATE)): resumed, the
        # TPM still has what OVMF measured into PCR 0, and the EKs with certificates
        flags = "not-need-init,startup-state"
        with swtpm_socket(copy, ctrl="tcp", data="tcp", flags=flags, extra_args=key_args) as tpm:
            indexes = tpm.tpm2("getcap", "handles-nv-index").stdout.decode().lower()
            for index in EK_CERTS:
                assert index in indexes, (variant, indexes)
            assert b"0x81010001" in tpm.tpm2("getcap", "handles-persistent").stdout
            pcr0 = tpm.tpm2("pcrread", "sha256:0").stdout.decode()
        assert re.search(r"0 : 0x[0-9A-F]{64}", pcr0), pcr0
        assert "0x" + "0" * 64 not in pcr0, pcr0


def run_tpm12(lv: Libvirt, home: Path, tmp_path: Path) -> None:
    """``version='1.2'``: libvirt runs swtpm_setup without --tpm2 (an EK, its certificates,
    the NV lock); the domain starts, stops and starts again on vtpmctl's swtpm. OVMF sends
    a TPM 1.2 nothing, so the TPM is asked directly: through vtpmctl while it runs, and
    afterwards through a real swtpm, which must find the EK swtpm_setup certified."""
    from vtpmctl.engine import tpm12

    dom = lv.define("tpm12", "<tpm model='tpm-tis'><backend type='emulator' version='1.2'/></tpm>")
    log_path = SWTPM_LOG / f"{dom.name}-swtpm.log"
    seen = log_path.stat().st_size if log_path.exists() else 0  # libvirt appends to it
    for _ in range(2):
        dom.start()  # the first start manufactures the TPM 1.2
        assert dom.state() == "running"
        listed = json.loads(vtpmctl(home, "list", "--json").stdout)["instances"]
        mine = [i for i in listed if i["name"] == f"libvirt-{dom.name}"]
        assert mine and mine[0]["tpm"] == "1.2", listed
        res = vtpmctl(home, "snapshot", "create", mine[0]["name"])  # the daemon answers
        assert res.returncode == 0, res.stderr
        dom.destroy()
    log = log_path.read_bytes()[seen:].decode(errors="replace")
    for line in ("Successfully created EK.", "Successfully locked NVRAM access."):
        assert line in log, log
    made = re.search(r"--ek ([0-9a-f]+)", log)
    assert made is not None and "--tpm2" not in log, log
    copy = tmp_path / "tpm12-state"
    shutil.copytree(state_of(lv, dom.name, "tpm1.2"), copy)
    with swtpm_socket(copy, tpm2=False, ctrl="tcp", data="tcp") as tpm:
        sock = tpm.data.connect(timeout=30)
        try:
            transact = tpm_transact(sock)
            assert tpm12.read_pubek(transact).hex() == made.group(1)  # no owner: readable
            indices = tpm12.nv_indices(transact)
        finally:
            sock.close()
    assert sorted(indices) == [tpm12.NV_INDEX_EK_CERT, tpm12.NV_INDEX_PLATFORM_CERT]
