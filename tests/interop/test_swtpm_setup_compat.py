"""vtpmctl's ``swtpm_setup`` against the real one, checked by a real swtpm and tpm2-tools.

Each case runs the same command line through both programs into two state dirs; a real
``swtpm socket`` then opens each state and the TPMs must hold the same persistent keys
(the same templates: the keys differ because each TPM has its own seeds), the same NV
indexes with the same attributes, certificates that chain to swtpm_localca's issuer, and
the same active PCR banks. Progress output must match line by line except timestamps,
the certificate tool's temp dir and the keys themselves.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from compat_bin import install
from rawsock import tpm_transact
from swtpm_peer import swtpm_socket

REAL = "swtpm_setup"
LOCALCA_ISSUER = Path("/var/lib/swtpm-localca/issuercert.pem")
LIBVIRT = ["--createek", "--create-ek-cert", "--create-platform-cert", "--lock-nvram"]


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(install(tmp_path_factory.mktemp("bin")) / "swtpm_setup")


def run(
    exe: str, args: list[str], pass_fds: tuple[int, ...] = ()
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([exe, *args], capture_output=True, timeout=120, pass_fds=pass_fds)


def normal(text: bytes) -> list[str]:
    """Progress lines without what differs by design (time, temp dir, key bytes)."""
    out = []
    for line in text.decode().splitlines():
        line = re.sub(r" @ .*", " @ TIME", line)
        line = re.sub(r"--ek \S+", "--ek KEY", line)
        line = re.sub(r"--dir \S+", "--dir DIR", line)
        out.append(line)
    return out


def inspect(state: Path, key_args: list[str]) -> dict[str, object]:
    """What a real swtpm reports about a state: handles, templates, NV attributes, banks."""
    with swtpm_socket(state, ctrl="tcp", data="tcp", extra_args=key_args) as tpm:
        persistent = tpm.tpm2("getcap", "handles-persistent").stdout.decode().split()
        indexes = tpm.tpm2("getcap", "handles-nv-index").stdout.decode().split()
        templates = {}
        for handle in persistent[1::2]:
            text = tpm.tpm2("readpublic", "-c", handle).stdout.decode()
            keep = [
                ln
                for ln in text.splitlines()
                if not re.match(r"^(name|qualified name|rsa|x|y):", ln)
            ]
            templates[handle] = keep
        nv = {}
        certs = {}
        for index in indexes[1::2]:
            pub = tpm.tpm2("nvreadpublic", index).stdout.decode()
            value = re.findall(r"value: (0x[0-9A-F]+)", pub)
            nv[index] = value
            if index.lower() in ("0x1c00002", "0x1c00016", "0x1c08000", "0x1c0001c"):
                certs[index] = tpm.tpm2("nvread", index).stdout
        banks = tpm.tpm2("getcap", "pcrs").stdout.decode()
    return {
        "persistent": persistent,
        "templates": templates,
        "nv": nv,
        "banks": banks,
        "certs": certs,
    }


def chain_ok(der: bytes) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    cert = x509.load_der_x509_certificate(der)
    issuer = x509.load_pem_x509_certificate(LOCALCA_ISSUER.read_bytes())
    assert cert.issuer == issuer.subject
    key = issuer.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    assert cert.signature_hash_algorithm is not None
    key.verify(
        cert.signature,
        cert.tbs_certificate_bytes,
        padding.PKCS1v15(),
        cert.signature_hash_algorithm,
    )


CASES = {
    "libvirt": ["--tpm2", "--vmid", "dom:0000", *LIBVIRT, "--not-overwrite"],
    "signing-3072-spk-ecc": [
        "--tpm2",
        "--createek",
        "--allow-signing",
        "--rsa-keysize",
        "3072",
        "--create-spk",
        "--ecc",
        "--create-ek-cert",
        "--lock-nvram",
        "--pcr-banks",
        "sha1,sha256",
    ],
    "sign-and-decrypt-spk": [
        "--tpm2",
        "--createek",
        "--allow-signing",
        "--decryption",
        "--create-spk",
        "--pcr-banks",
        "-",
    ],
}


@pytest.mark.parametrize("name", list(CASES))
def test_manufacture_like_swtpm_setup(name: str, ours: str, tmp_path: Path) -> None:
    args = CASES[name]
    results = {}
    for who, exe in (("ours", ours), ("real", REAL)):
        state = tmp_path / who
        state.mkdir()
        res = run(exe, [*args, "--tpm-state", str(state)])
        assert res.returncode == 0, res.stderr
        results[who] = (
            normal(res.stdout),
            res.stderr,
            inspect(state, []),
            (state / "tpm2-00.permall").stat().st_mode & 0o777,
        )
    assert results["ours"][:2] == results["real"][:2]
    mine, theirs = results["ours"][2], results["real"][2]
    for key in ("persistent", "templates", "nv", "banks"):
        assert mine[key] == theirs[key], key  # type: ignore[index]
    assert results["ours"][3] == results["real"][3]
    for der in mine["certs"].values():  # type: ignore[attr-defined]
        chain_ok(der)


def test_encrypted_states_open_both_ways(
    ours: str, tmp_path: Path, vtpm_server: Callable[..., Any]
) -> None:
    """--pwdfile-fd as libvirt passes it, and --keyfile: each state opens in the other."""
    pw = tmp_path / "pw"
    pw.write_bytes(b"a libvirt secret")
    pw.chmod(0o600)
    key = tmp_path / "key"
    key.write_bytes(b"00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n")
    key.chmod(0o600)
    variants = [
        (["--pwdfile-fd", "{fd}", "--cipher", "aes-256-cbc"], f"pwdfile={pw},mode=aes-256-cbc"),
        (["--pwdfile", str(pw)], f"pwdfile={pw}"),
        (["--keyfile", str(key), "--cipher", "aes-256-cbc"], f"file={key},mode=aes-256-cbc"),
    ]
    for i, (opts, swtpm_key) in enumerate(variants):
        for who, exe in (("ours", ours), ("real", REAL)):
            state = tmp_path / f"{who}{i}"
            state.mkdir()
            fd = os.open(pw, os.O_RDONLY)
            try:
                args = [a.format(fd=fd) for a in opts]
                res = run(
                    exe, ["--tpm2", "--createek", "--tpm-state", str(state), *args], pass_fds=(fd,)
                )
            finally:
                os.close(fd)
            assert res.returncode == 0, (who, opts, res.stdout, res.stderr)
            # the real swtpm opens both, with the key swtpm_setup would have given it
            found = inspect(state, ["--key", swtpm_key])
            assert "0x81010001" in found["persistent"]  # type: ignore[operator]
            if who == "real":  # and vtpmctl's daemon opens the real one's
                server = vtpm_server(
                    state,
                    ctrl="tcp",
                    data="tcp",
                    flags="not-need-init,startup-clear",
                    extra_args=["--key", swtpm_key],
                )
                handles = server.tpm2("getcap", "handles-persistent").stdout
                assert b"0x81010001" in handles


def test_refusals_and_capabilities(ours: str, tmp_path: Path) -> None:
    state = tmp_path / "s"
    state.mkdir()
    assert run(ours, ["--tpm2", "--tpm-state", str(state)]).returncode == 0
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    cases = [
        ["--tpm2"],
        ["--tpm2", "--tpm-state", str(state)],
        ["--tpm2", "--tpm-state", str(state), "--not-overwrite"],
        ["--tpm2", "--tpm-state", str(tmp_path / "missing")],
        ["--print-capabilities"],
        ["--tpm2", "--take-ownership", "--tpm-state", str(fresh)],
        ["--tpm2", "--ownerpass", "x", "--tpm-state", str(state), "--not-overwrite"],
    ]
    for args in cases:
        mine, real = run(ours, args), run(REAL, args)
        assert (mine.returncode, mine.stdout, mine.stderr) == (
            real.returncode,
            real.stdout,
            real.stderr,
        ), args
    bogus = run(ours, ["--bogus"])
    assert bogus.returncode == 1
    assert bogus.stderr.endswith(b"unrecognized option '--bogus'\n")


def nv_indexes_of_file(image: Path, tmp_path: Path) -> str:
    """A real swtpm on a linear state file (Proxmox's backend): its NV indexes."""
    from swtpm_peer import free_tcp_port_pair

    port = free_tcp_port_pair()
    pid_file = tmp_path / f"{image.name}.pid"
    subprocess.run(
        [
            "swtpm",
            "socket",
            "--tpm2",
            "--tpmstate",
            f"backend-uri=file://{image}",
            "--server",
            f"type=tcp,port={port},bindaddr=127.0.0.1",
            "--ctrl",
            f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
            "--flags",
            "not-need-init,startup-clear",
            "-d",
            "--pid",
            f"file={pid_file}",
        ],
        check=True,
        timeout=30,
    )
    try:
        env = dict(os.environ, TPM2TOOLS_TCTI=f"swtpm:host=127.0.0.1,port={port}")
        res = subprocess.run(
            ["tpm2_getcap", "handles-nv-index"], capture_output=True, env=env, timeout=30
        )
        return res.stdout.decode()
    finally:
        subprocess.run(["swtpm_ioctl", "--tcp", f"127.0.0.1:{port + 1}", "-s"], timeout=30)


def test_proxmox_linear_file(ours: str, tmp_path: Path) -> None:
    """Proxmox's command line on the linear file backend: same lines, same TPM."""
    found = {}
    for who, exe in (("ours", ours), ("real", REAL)):
        image = tmp_path / f"{who}.raw"
        args = [
            "--tpmstate",
            f"file://{image}",
            *LIBVIRT,
            "--config",
            "/etc/swtpm_setup.conf",
            "--runas",
            "0",
            "--not-overwrite",
            "--tpm2",
            "--ecc",
        ]
        res = run(exe, args)
        assert res.returncode == 0, res.stderr
        again = run(exe, args)
        assert (again.returncode, again.stdout) == (0, b"Not overwriting existing state file.\n")
        found[who] = (normal(res.stdout), image.stat().st_size, nv_indexes_of_file(image, tmp_path))
    assert found["ours"] == found["real"]
    assert "0x1C08000" in found["ours"][2]


def test_create_config_files(ours: str, tmp_path: Path) -> None:
    """The per-user configuration: the same files (paths aside) and the same refusals."""
    trees = {}
    for who, exe in (("ours", ours), ("real", REAL)):
        base = tmp_path / who
        env = dict(os.environ, XDG_CONFIG_HOME=str(base))
        calls = [
            ["--create-config-files", "root"],
            ["--create-config-files", "root"],
            ["--create-config-files=root,skip-if-exist"],
            ["--create-config-files"],
        ]
        outcome = []
        for args in calls:
            res = subprocess.run([exe, *args], capture_output=True, env=env, timeout=60)
            outcome.append(
                (
                    res.returncode,
                    res.stdout.replace(str(base).encode(), b"B"),
                    res.stderr.replace(str(base).encode(), b"B"),
                )
            )
        files = sorted(str(p.relative_to(base)) for p in base.rglob("*"))
        conf = [
            ln.replace(str(base), "B")
            for ln in (base / "swtpm_setup.conf").read_text().splitlines()
            if not ln.startswith("#")
        ]
        trees[who] = (outcome, files, conf, (base / "swtpm-localca.options").read_text())
    assert trees["ours"] == trees["real"]


# ---------------------------------------------------------------- TPM 1.2

TPM12_CASES = {
    "well-known": (["--owner-well-known", "--srk-well-known"], bytes(20)),
    "passwords": (["--ownerpass", "the owner", "--srkpass", "the srk"], b"the owner"),
}


@dataclass
class Tpm12Reads:
    modulus: bytes
    ek_parms: object  # the EK's TPM_KEY_PARMS as the TPM reports them
    nv: dict[int, object]  # each index's attributes and PCR bindings
    certs: dict[int, bytes]  # DER, out of the TCG header
    headed: dict[int, bool]  # the header's size matched


def tpm12_reads(
    state: Path, owner: bytes, exe: str | None, key_args: Sequence[str] = ()
) -> Tpm12Reads:
    """What raw TPM 1.2 commands read from a state on ``exe`` (None: the real swtpm)."""
    from vtpmctl.engine import tpm12
    from vtpmctl.engine.tpm2 import TpmError

    auth = hashlib.sha1(owner).digest()
    with swtpm_socket(
        state, tpm2=False, ctrl="tcp", data="tcp", exe=exe, extra_args=key_args
    ) as tpm:
        sock = tpm.data.connect(timeout=30)
        try:
            transact = tpm_transact(sock)
            with pytest.raises(TpmError):  # the owner's password is the one given
                tpm12.owner_read_ek(transact, hashlib.sha1(b"wrong").digest())
            with pytest.raises(TpmError):  # the NV is locked: reading needs the owner
                tpm12.nv_read(transact, tpm12.NV_INDEX_EK_CERT, 8)
            publics = {i: tpm12.nv_public(transact, i) for i in tpm12.nv_indices(transact)}
            stored = {i: tpm12.nv_read(transact, i, p["size"], auth) for i, p in publics.items()}
            modulus = tpm12.owner_read_ek(transact, auth)
            ek = tpm12.OWNER_READ_INTERNAL_PUB
            ek_parms = tpm12.execute(transact, ek, {"handle": tpm12.KH_EK}, auth=auth)["pubkey"]
        finally:
            sock.close()
    return Tpm12Reads(
        modulus,
        ek_parms["parms"],
        {i: (p["permission"], p["read_pcr"], p["write_pcr"]) for i, p in publics.items()},
        {i: tpm12.unstored_cert(data) for i, data in stored.items()},
        {i: len(tpm12.unstored_cert(data)) + 7 == len(data) for i, data in stored.items()},
    )


@pytest.mark.parametrize("case", list(TPM12_CASES))
def test_tpm12_manufacture_both_ways(case: str, ours: str, tmp_path: Path) -> None:
    """A TPM 1.2 with EK, certificates, NV lock and an owner, by each swtpm_setup; each
    state is read through raw TPM 1.2 commands on the real swtpm and on vtpmctl's (with the
    passwords, the state is also encrypted with a passphrase, which both servers are given)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import rsa

    options, owner = TPM12_CASES[case]
    args = [*LIBVIRT, "--take-ownership", *options, "--display", "--vmid", "dom:1"]
    key_args: list[str] = []
    if case == "passwords":  # and an encrypted state, as libvirt's <encryption> makes
        pw = tmp_path / "pw"
        pw.write_bytes(b"a libvirt secret")
        args += ["--pwdfile", str(pw), "--cipher", "aes-256-cbc"]
        key_args = ["--key", f"pwdfile={pw},mode=aes-256-cbc"]
    lines, reads = {}, {}
    for who, exe in (("ours", ours), ("real", REAL)):
        state = tmp_path / who
        state.mkdir()
        res = run(exe, [*args, "--tpm-state", str(state)])
        assert res.returncode == 0, (who, res.stdout, res.stderr)
        lines[who] = normal(res.stdout)
        made = re.search(r"--ek ([0-9a-f]+)", res.stdout.decode())
        assert made is not None
        assert sorted(p.name for p in state.iterdir()) == [".lock", "tpm-00.permall"]
        for server in (None, str(Path(ours).parent / "swtpm")):
            found = tpm12_reads(state, owner, server, key_args)
            assert found.modulus.hex() == made.group(1), (who, server)
            reads[(who, server is None)] = found
    assert lines["ours"] == lines["real"]
    for found in reads.values():
        assert found.nv == reads[("real", True)].nv
        assert found.ek_parms == reads[("real", True)].ek_parms
        assert set(found.nv) == {0x1000F000, 0x1000F002}
        assert all(found.headed.values())
        for der in found.certs.values():
            chain_ok(der)
            key = x509.load_der_x509_certificate(der).public_key()
            assert isinstance(key, rsa.RSAPublicKey)
            assert key.public_numbers().n == int.from_bytes(found.modulus, "big")
    for who in ("ours", "real"):  # both servers read the same from one state
        assert reads[(who, True)] == reads[(who, False)]


def test_tpm12_certificates_from_vtpmctls_ca(ours: str, tmp_path: Path) -> None:
    """``create_certs_tool = vtpmctl``: the CA's DER certificates go into NV with the header."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import rsa

    home = tmp_path / "home"
    config = tmp_path / "swtpm_setup.conf"
    config.write_text("create_certs_tool = vtpmctl\n")
    state = tmp_path / "state"
    state.mkdir()
    args = [*LIBVIRT, "--take-ownership", "--owner-well-known", "--config", str(config)]
    res = subprocess.run(
        [ours, *args, "--tpm-state", str(state)],
        capture_output=True,
        timeout=120,
        env=dict(os.environ, VTPMCTL_HOME=str(home)),
    )
    assert res.returncode == 0, res.stderr
    found = tpm12_reads(state, bytes(20), None)
    ca = x509.load_pem_x509_certificate((home / "etc" / "ca" / "ca-cert.pem").read_bytes())
    assert set(found.certs) == {0x1000F000, 0x1000F002}
    for der in found.certs.values():
        cert = x509.load_der_x509_certificate(der)
        cert.verify_directly_issued_by(ca)
        key = cert.public_key()
        assert isinstance(key, rsa.RSAPublicKey)
        assert key.public_numbers().n == int.from_bytes(found.modulus, "big")


def test_tpm12_proxmox_file_encrypted(ours: str, tmp_path: Path) -> None:
    """Proxmox's TPM 1.2 command line on an encrypted linear file, with the EK certificate
    also written out: the same lines, image size and certificate file (DER, 0640)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import rsa

    pw = tmp_path / "pw"
    pw.write_bytes(b"a proxmox secret")
    found = {}
    for who, exe in (("ours", ours), ("real", REAL)):
        image, certs = tmp_path / f"{who}.raw", tmp_path / f"{who}-certs"
        certs.mkdir()
        args = ["--tpmstate", f"file://{image}", *LIBVIRT, "--config", "/etc/swtpm_setup.conf"]
        args += ["--runas", "0", "--not-overwrite", "--pwdfile", str(pw)]
        res = run(exe, [*args, "--write-ek-cert-files", str(certs)])
        assert res.returncode == 0, res.stderr
        files = {p.name: p.stat().st_mode & 0o777 for p in certs.iterdir()}
        der = (certs / "ek-rsa2048.crt").read_bytes()
        chain_ok(der)
        key = x509.load_der_x509_certificate(der).public_key()
        assert isinstance(key, rsa.RSAPublicKey)
        made = re.search(r"--ek ([0-9a-f]+)", res.stdout.decode())
        assert made is not None and key.public_numbers().n == int(made.group(1), 16)
        found[who] = (normal(res.stdout), image.stat().st_size, files)
    assert found["ours"] == found["real"]
    assert found["ours"][2] == {"ek-rsa2048.crt": 0o640}


@pytest.mark.parametrize(
    "args",
    [
        ["--create-platform-cert"],  # 0.7.1: an EK, no certificate at all for a TPM 1.2
        ["--tpm2", "--create-platform-cert"],  # the platform certificate, no EK ones
        ["--take-ownership", "--lock-nvram"],  # ownership implies the EK
        ["--createek", "--ownerpass", "x", "--srk-well-known"],  # ignored without ownership
        ["--createek", "--allow-signing", "--decryption"],  # ignored for a TPM 1.2
        ["--createek", "--ecc"],  # refused for a TPM 1.2
        ["--rsa-keysize", "3072"],  # a TPM 1.2 has 2048 bits only
        ["--tpm2", "--rsa-keysize", "4096"],
    ],
    ids=[
        "tpm12-platform",
        "tpm2-platform",
        "tpm12-own-lock",
        "tpm12-pass-only",
        "tpm12-signing",
        "tpm12-ecc",
        "tpm12-rsa3072",
        "tpm2-rsa4096",
    ],
)
def test_options_like_swtpm_setup(args: list[str], ours: str, tmp_path: Path) -> None:
    outputs = {}
    for who, exe in (("ours", ours), ("real", REAL)):
        state = tmp_path / who
        state.mkdir()
        res = run(exe, [*args, "--tpm-state", str(state)])
        outputs[who] = (res.returncode, normal(res.stdout), res.stderr)
    assert outputs["ours"] == outputs["real"]
