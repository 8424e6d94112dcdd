"""``swtpm_setup``: swtpm 0.7.1's TPM manufacturing tool, served by vtpmctl's engine.

libvirt runs ``swtpm_setup --tpm2 --tpm-state DIR --vmid NAME:UUID --logfile LOG
--createek --create-ek-cert --create-platform-cert --lock-nvram --not-overwrite
[--pwdfile-fd N --cipher aes-256-cbc]`` before a domain's first start, and
``--print-capabilities`` to learn what it may ask; Proxmox adds ``--config``,
``--runas 0`` and ``--tpmstate file://``. This program accepts swtpm_setup
0.7.1's options and prints its progress lines to stdout (or ``--logfile``),
with its exit codes. The TPM is made by the ``_swtpm_setup`` child process
(vtpmctl.engine.setup), which leaves the same keys, NV indexes and state file
as swtpm_setup does. Certificates come from the ``create_certs_tool`` that
swtpm_setup.conf names (normally swtpm_localca, called with the arguments
swtpm_setup passes it), or from vtpmctl's own CA when the configuration names
``vtpmctl`` or no tool.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import grp
import hashlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from vtpmctl import __version__
from vtpmctl.compat.getopt import NO_ARG, OPTIONAL, REQUIRED, GetoptLong, Opt
from vtpmctl.errors import UsageError, VtpmctlError
from vtpmctl.model import BlobKind

SETUP_TIMEOUT = 120.0
DEFAULT_PCR_BANKS = "sha256"
RSA_KEYSIZES = (2048, 3072)
CIPHERS = {"aes-cbc": 16, "aes-128-cbc": 16, "aes-256-cbc": 32}
SYSTEM_CONFIG = Path("/etc/swtpm_setup.conf")
CERT_FILE_MODE = 0o640  # --write-ek-cert-files' files, whatever the umask (as 0.7.1)
OWN_CA = "vtpmctl"  # create_certs_tool value that picks vtpmctl's CA
PLATFORM_INDEX = 0x01C08000
# TPM 1.2 ownership: the passwords swtpm_setup uses unless told, and the "well-known"
# secret (its SHA-1 is the authorisation, as swtpm_setup 0.7.1 computes it).
DEFAULT_OWNER_PASSWORD = "ooo"
DEFAULT_SRK_PASSWORD = "sss"
WELL_KNOWN_SECRET = bytes(20)

# What swtpm_setup 0.7.1 prints for --print-capabilities, for what vtpmctl really does.
FEATURES = (
    "tpm-1.2",
    "tpm-2.0",
    "cmdarg-keyfile-fd",
    "cmdarg-pwdfile-fd",
    "tpm12-not-need-root",
    "cmdarg-write-ek-cert-files",
    "cmdarg-create-config-files",
    "cmdarg-reconfigure-pcr-banks",
    *(f"tpm2-rsa-keysize-{n}" for n in RSA_KEYSIZES),
)

OPTIONS = [
    Opt("runas", REQUIRED),
    Opt("config", REQUIRED),
    Opt("tpm-state", REQUIRED),
    Opt("tpmstate", REQUIRED),
    Opt("tpm", REQUIRED),
    Opt("swtpm_ioctl", REQUIRED),
    Opt("tpm2"),
    Opt("createek"),
    Opt("create-spk"),
    Opt("allow-signing"),
    Opt("decryption"),
    Opt("ecc"),
    Opt("take-ownership"),
    Opt("ownerpass", REQUIRED),
    Opt("owner-well-known"),
    Opt("srkpass", REQUIRED),
    Opt("srk-well-known"),
    Opt("create-ek-cert"),
    Opt("create-platform-cert"),
    Opt("lock-nvram"),
    Opt("display"),
    Opt("logfile", REQUIRED),
    Opt("keyfile", REQUIRED),
    Opt("keyfile-fd", REQUIRED),
    Opt("pwdfile", REQUIRED),
    Opt("pwdfile-fd", REQUIRED),
    Opt("cipher", REQUIRED),
    Opt("overwrite"),
    Opt("not-overwrite"),
    Opt("pcr-banks", REQUIRED),
    Opt("rsa-keysize", REQUIRED),
    Opt("write-ek-cert-files", REQUIRED),
    Opt("tcsd-system-ps-file", REQUIRED),
    Opt("print-capabilities"),
    Opt("create-config-files", OPTIONAL),
    Opt("reconfigure"),
    Opt("vmid", REQUIRED),
    Opt("version", NO_ARG),
    Opt("help", NO_ARG),
]

# The first line has swtpm_setup's shape ("... version 0.7.1"), which scripts parse;
# --help starts with it too, as swtpm_setup's does.
VERSION = f"swtpm_setup-compatible TPM setup tool version 0.7.1, from vtpmctl {__version__}\n"
USAGE = f"""\
{VERSION}swtpm_setup (vtpmctl {__version__}): manufacture a TPM's initial state

Usage: swtpm_setup [options]

--tpm-state DIR, --tpmstate DIR
                   where the state goes (required); dir://DIR or file://FILE
--tpm2             make a TPM 2.0 (default: TPM 1.2)
--createek         create the EKs (TPM 2.0: RSA and ECC NIST P-384; TPM 1.2: RSA 2048)
--create-ek-cert   also an EK certificate for each (implies --createek)
--create-platform-cert
                   also a platform certificate (implies --createek; for a TPM 1.2,
                   only together with --create-ek-cert)
--lock-nvram       write-lock the NV indexes that were written (TPM 1.2: lock the NV)
--create-spk       create a storage primary key (RSA 2048, or ECC P-384 with --ecc)
--ecc              make the storage primary key an ECC key
--allow-signing    EKs that can sign (non-standard; their templates go into NV)
--decryption       EKs that can decrypt (the default without --allow-signing)
--rsa-keysize N    size of the RSA EK: {", ".join(map(str, RSA_KEYSIZES))} or max
--pcr-banks LIST   PCR banks to activate, e.g. sha1,sha256; '-' keeps all
                   (default: active_pcr_banks of the configuration, else {DEFAULT_PCR_BANKS})
--reconfigure      change the PCR banks of an existing TPM 2.0; no new keys
--overwrite        replace an existing state
--not-overwrite    leave an existing state alone and succeed
--keyfile FILE, --keyfile-fd FD
                   encrypt the state with this hex key
--pwdfile FILE, --pwdfile-fd FD
                   encrypt the state with a key derived from this passphrase
--cipher NAME      aes-128-cbc (default) or aes-256-cbc
--config FILE      configuration (default: $XDG_CONFIG_HOME, $HOME or /etc swtpm_setup.conf)
--vmid ID          passed to the certificate tool
--logfile FILE     append progress and errors to FILE instead of stdout/stderr
--write-ek-cert-files DIR
                   also write the EK certificates to DIR as ek-<type>.crt
--create-config-files [overwrite][,root][,skip-if-exist]
                   write per-user swtpm_setup and swtpm-localca configuration files
--runas USER       run as USER (root only)
--display          show what was made at the end
--take-ownership   take ownership of a TPM 1.2 (implies --createek)
--ownerpass P      the owner password (default: {DEFAULT_OWNER_PASSWORD})
--owner-well-known an owner password of 20 zero bytes
--srkpass P        the SRK password (default: {DEFAULT_SRK_PASSWORD})
--srk-well-known   an SRK password of 20 zero bytes
--tpm PATH, --swtpm_ioctl PATH, --tcsd-system-ps-file FILE
                   accepted for compatibility; vtpmctl serves the TPM itself
--print-capabilities
                   print the supported features as JSON
--version          print the version
--help, -h         print this help
"""


class SwtpmSetupError(VtpmctlError):
    """A failure swtpm_setup reports before it exits with 1; the text is its message."""


@dataclass
class Setup:
    """The parsed command line."""

    values: dict[str, str] = field(default_factory=dict)
    flags: set[str] = field(default_factory=set)

    def has(self, name: str) -> bool:
        return name in self.flags or name in self.values


class Output:
    """Where progress and errors go: the log file when given, else stdout and stderr."""

    def __init__(self) -> None:
        self.log: TextIO | None = None

    def open(self, path: str) -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise SwtpmSetupError(f"Cannot write to logfile {path}: {exc.strerror}") from None
        self.log = os.fdopen(fd, "a", buffering=1)

    def info(self, line: str) -> None:
        (self.log or sys.stdout).write(line + "\n")

    def error(self, line: str) -> None:
        (self.log or sys.stderr).write(line + "\n")


# ---------------------------------------------------------------- configuration


def config_path(given: str | None, env: dict[str, str]) -> Path:
    """--config, else the first of $XDG_CONFIG_HOME, $HOME and /etc that has the file."""
    if given:
        return Path(given)
    candidates = []
    if env.get("XDG_CONFIG_HOME"):
        candidates.append(Path(env["XDG_CONFIG_HOME"]) / "swtpm_setup.conf")
    if env.get("HOME"):
        candidates.append(Path(env["HOME"]) / ".config" / "swtpm_setup.conf")
        candidates.append(Path(env["HOME"]) / "swtpm_setup.conf")
    return next((c for c in candidates if _is_file(c)), SYSTEM_CONFIG)


def _is_file(path: Path) -> bool:
    """A file this user can see (libvirt may leave HOME at another user's home)."""
    try:
        return path.is_file()
    except OSError:
        return False


def read_config(path: Path) -> dict[str, str]:
    """``key = value`` lines; ``#`` starts a comment. A missing file is an empty one."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise SwtpmSetupError(f"Could not read config file {path}: {exc.strerror}") from None
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        name, sep, value = line.partition("=")
        if sep and name.strip():
            values[name.strip()] = value.strip()
    return values


def capabilities() -> str:
    features = ", ".join(f'"{f}"' for f in FEATURES)
    return f'{{ "type": "swtpm_setup", "features": [ {features} ], "version": "0.7.1" }}\n'


# ---------------------------------------------------------------- parsing


def parse(argv: list[str], prog: str) -> Setup:
    args = ["--help" if a == "-h" else a for a in argv]
    parsed = GetoptLong(prog, OPTIONS, long_only=False).parse(args)
    # in order, as swtpm_setup's getopt loop: the first of --help (exit 0), --version
    # (exit 1, as 0.7.1) and an error decides
    for name, *_ in parsed.before_error():
        if name == "help":
            sys.stdout.write(USAGE)
            raise SystemExit(0)
        if name == "version":
            sys.stdout.write(VERSION)
            raise SystemExit(1)
    if parsed.errors:
        for message in parsed.errors:
            sys.stderr.write(message + "\n")
        sys.stdout.write(USAGE)
        raise SystemExit(1)
    setup = Setup()
    for name, value, _, _ in parsed.options:
        if value is None:
            setup.flags.add(name)
        else:
            setup.values["tpm-state" if name == "tpmstate" else name] = value
    if "create-config-files" in setup.flags and parsed.operands:
        # 0.7.1 takes its optional value from the next word too
        setup.values["create-config-files"] = parsed.operands[0]
    return setup


def _storage(spec: str, user: str) -> tuple[str, Path]:
    """("dir", DIR) or ("file", FILE) from --tpm-state; the user must be able to write there."""
    if spec.startswith("file://"):
        path = Path(spec.removeprefix("file://"))
        target = path if path.exists() else path.parent
        if not os.access(target, os.W_OK) or path.is_dir():
            raise SwtpmSetupError(
                f"User {user} cannot access file {path}. Make sure it is writable "
                "or can be created."
            )
        return "file", path
    path = Path(spec.removeprefix("dir://"))
    if not (path.is_dir() and os.access(path, os.R_OK | os.W_OK | os.X_OK)):
        raise SwtpmSetupError(
            f"User {user} cannot access directory {path}. Make sure it exists and is a directory."
        )
    return "dir", path


def _state(backend: str, path: Path, tpm2: bool) -> Any:
    """The state as the engine sees it (no key: enough to look and to delete)."""
    if backend == "file":
        from vtpmctl.store.linearfile import LinearFile

        return LinearFile(path, tpm2=tpm2)
    from vtpmctl.store.statedir import StateDir

    return StateDir(path, tpm2=tpm2)


# swtpm_setup's key options and the ``--key`` source each hands to swtpm.
KEY_OPTIONS = {"keyfile": "file", "keyfile-fd": "fd", "pwdfile": "pwdfile", "pwdfile-fd": "pwdfd"}


def state_key(setup: Setup) -> tuple[bytes | None, str | None]:
    """The state key and how it was given ("key" or "passphrase"), or (None, None).

    The options become the ``--key`` value swtpm_setup would give swtpm (default
    cipher aes-128-cbc, a passphrase through PBKDF2), read by vtpmctl's key parser.
    """
    from vtpmctl.store.keys import KeyFileError, parse_key_spec

    cipher = setup.values.get("cipher", "aes-128-cbc")
    if cipher not in CIPHERS:
        raise SwtpmSetupError(f"Unsupported cipher {cipher}.")
    given = [name for name in KEY_OPTIONS if name in setup.values]
    if not given:
        return None, None
    name = given[0]
    source = KEY_OPTIONS[name]
    spec = f"{source}={setup.values[name]},mode={cipher}"
    if source.startswith("pwd"):
        spec += ",kdf=pbkdf2"
    else:
        spec += ",format=hex"
    try:
        key = parse_key_spec(spec, f"--{name}").resolve()
    except KeyFileError as exc:
        raise SwtpmSetupError(str(exc)) from None
    return key.material, "passphrase" if source.startswith("pwd") else "key"


# ---------------------------------------------------------------- certificates


def _now() -> str:
    return dt.datetime.now().astimezone().strftime("%a %d %b %Y %I:%M:%S %p %Z")


def _who() -> str:
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = str(os.geteuid())
    try:
        group = grp.getgrgid(os.getegid()).gr_name
    except KeyError:
        group = str(os.getegid())
    return f"{user}:{group}"


@dataclass
class CertTool:
    """swtpm_setup.conf's create_certs_tool with its configuration and options files."""

    tool: str
    config: str | None
    options: str | None
    vmid: str | None
    out: Output
    tpm2: bool = True

    def issue(self, kind: str, ek: dict[str, Any], info: dict[str, str], workdir: Path) -> bytes:
        key = ek["modulus"] if "modulus" in ek else f"x={ek['x']},y={ek['y']},id=secp384r1"
        argv = [self.tool, "--type", kind, "--ek", key, "--dir", str(workdir)]
        if self.vmid:
            argv += ["--vmid", self.vmid]
        argv += [
            "--tpm-spec-family",
            info["spec_family"],
            "--tpm-spec-level",
            info["spec_level"],
            "--tpm-spec-revision",
            info["spec_revision"],
            "--tpm-manufacturer",
            info["manufacturer"],
            "--tpm-model",
            info["model"],
            "--tpm-version",
            info["version"],
        ]
        if self.tpm2:
            argv.append("--tpm2")
        if self.config:
            argv += ["--configfile", self.config]
        if self.options:
            argv += ["--optsfile", self.options]
        self.out.info("  Invoking " + " ".join(argv))
        try:
            proc = subprocess.run(argv, capture_output=True, timeout=SETUP_TIMEOUT, check=False)
        except OSError as exc:
            raise SwtpmSetupError(f"Could not run {self.tool}: {exc.strerror}") from None
        prefix = os.path.basename(self.tool) + ": "
        for line in (proc.stdout + proc.stderr).decode(errors="replace").splitlines():
            self.out.info(prefix + line)
        name = "ek.cert" if kind == "ek" else "platform.cert"
        cert = workdir / name
        if proc.returncode != 0 or not cert.exists():
            raise SwtpmSetupError(f"{self.tool} exit with status {proc.returncode}")
        data = cert.read_bytes()
        cert.unlink()
        return data


@dataclass
class OwnCA:
    """vtpmctl's local CA (the one ``vtpmctl create`` uses) in swtpm_localca's place."""

    out: Output

    def issue(self, kind: str, ek: dict[str, Any], info: dict[str, str], workdir: Path) -> bytes:
        from vtpmctl import __version__ as version
        from vtpmctl.store.ca import CAError, LocalCA
        from vtpmctl.store.paths import store_roots

        del workdir
        key = _public_key(ek)
        details = {
            "platform_manufacturer": "vtpmctl",
            "platform_model": "vtpmctl",
            "platform_version": version,
            **info,
        }
        try:
            ca = LocalCA(store_roots().config / "ca")
        except (CAError, OSError) as exc:
            raise SwtpmSetupError(f"vtpmctl's CA cannot be used: {exc}") from None
        if kind == "ek":
            return ca.issue_ek_cert(key, details)
        return ca.issue_platform_cert(key, details)


def _public_key(ek: dict[str, Any]) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if "modulus" in ek:
        return rsa.RSAPublicNumbers(65537, int(ek["modulus"], 16)).public_key()
    x, y = int(ek["x"], 16), int(ek["y"], 16)
    return ec.EllipticCurvePublicNumbers(x, y, ec.SECP384R1()).public_key()


# ---------------------------------------------------------------- the flow


def _child(request: dict[str, Any]) -> dict[str, Any]:
    from vtpmctl.childproc import ChildError, run_child

    try:
        return run_child("_swtpm_setup", request, timeout=SETUP_TIMEOUT, cwd=None).answer
    except ChildError as exc:
        raise SwtpmSetupError(f"Error: Could not setup the TPM: {exc}") from None


def _ek_name(ek: dict[str, Any]) -> str:
    return {"rsa2048": "RSA 2048", "rsa3072": "RSA 3072"}.get(ek["algorithm"], "ECC")


def _cert_file_name(ek: dict[str, Any]) -> str:
    return {"rsa2048": "ek-rsa2048.crt", "rsa3072": "ek-rsa3072.crt"}.get(
        ek["algorithm"], "ek-secp384r1.crt"
    )


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="swtpm_setup.certs."))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _remove_state(state: Any) -> None:
    for kind in BlobKind:
        with contextlib.suppress(FileNotFoundError):
            state.delete(kind.file_name)


def _pcr_banks(setup: Setup, config: dict[str, str]) -> list[str] | None:
    text = setup.values.get("pcr-banks") or config.get("active_pcr_banks") or DEFAULT_PCR_BANKS
    if text.strip() == "-":
        return None
    return [b.strip() for b in text.split(",") if b.strip()]


def _rsa_keysize(setup: Setup, tpm2: bool, out: Output) -> int | None:
    """--rsa-keysize; a TPM 1.2 has 2048-bit keys only (its swtpm lists no other size).

    None after an unknown size, which 0.7.1 reports as progress (stdout), not as an error.
    """
    text = setup.values.get("rsa-keysize", "2048")
    sizes = RSA_KEYSIZES if tpm2 else RSA_KEYSIZES[:1]
    size = max(sizes) if text == "max" else int(text) if text.isdigit() else 0
    if size not in RSA_KEYSIZES:
        out.info(f"Unsupported RSA key size {text}.")
        return None
    if size not in sizes:
        raise SwtpmSetupError(f"{size} bit RSA keys are not supported by libtpms.")
    return size


def _check_options(setup: Setup, tpm2: bool) -> None:
    # 0.7.1 ignores --allow-signing and --decryption for a TPM 1.2
    for name in ("create-spk", "ecc", "reconfigure"):
        if setup.has(name) and not tpm2:
            raise SwtpmSetupError(f"--{name} requires --tpm2.")
    if tpm2 and setup.has("take-ownership"):  # the password options alone are ignored
        raise SwtpmSetupError("Taking ownership is not supported for TPM 2.")


def _auth_digest(setup: Setup, password: str, well_known: str, default: str) -> str:
    """The 20-byte authorisation (hex) for TPM_TakeOwnership: SHA-1 of the password."""
    if password in setup.values:
        secret = setup.values[password].encode()
    elif setup.has(well_known):
        secret = WELL_KNOWN_SECRET
    else:
        secret = default.encode()
    return hashlib.sha1(secret).hexdigest()


def _ownership(setup: Setup, tpm2: bool) -> dict[str, str]:
    """The owner and SRK secrets the child needs for --take-ownership (stdin only)."""
    if tpm2 or not setup.has("take-ownership"):
        return {}
    return {
        "owner_auth": _auth_digest(setup, "ownerpass", "owner-well-known", DEFAULT_OWNER_PASSWORD),
        "srk_auth": _auth_digest(setup, "srkpass", "srk-well-known", DEFAULT_SRK_PASSWORD),
    }


def _issuer(setup: Setup, config: dict[str, str], out: Output) -> CertTool | OwnCA:
    tool = config.get("create_certs_tool", "")
    if not tool or tool == OWN_CA:
        return OwnCA(out)
    return CertTool(
        tool,
        config.get("create_certs_tool_config"),
        config.get("create_certs_tool_options"),
        setup.values.get("vmid"),
        out,
        tpm2="tpm2" in setup.flags,
    )


def _existing_state(setup: Setup, state: Any, reconfigure: bool, out: Output) -> int | None:
    """What a state already there means: the exit code to stop with, or None to go on
    (after removing it for --overwrite)."""
    exists = state.exists(BlobKind.PERMANENT.file_name)
    if reconfigure and not exists:
        raise SwtpmSetupError("Cannot reconfigure: no TPM state found.")
    if exists and not reconfigure:
        if "not-overwrite" in setup.flags:
            out.info("Not overwriting existing state file.")
            return 0
        if "overwrite" not in setup.flags:
            out.error("Found existing TPM state 'permall'.")
            return 1
        _remove_state(state)
    return None


def manufacture(setup: Setup, out: Output) -> int:
    """The whole run once options are known; 0, or 1 after an error line."""
    env = dict(os.environ)
    tpm2 = "tpm2" in setup.flags
    _check_options(setup, tpm2)
    config = read_config(config_path(setup.values.get("config"), env))
    if "tpm-state" not in setup.values:
        raise SwtpmSetupError("--tpm-state must be provided")
    backend, location = _storage(setup.values["tpm-state"], _who().split(":")[0])
    if not tpm2 and _rsa_keysize(setup, tpm2, out) is None:  # before the state, as 0.7.1
        return 1
    state = _state(backend, location, tpm2)
    reconfigure = "reconfigure" in setup.flags
    stop = _existing_state(setup, state, reconfigure, out)
    if stop is not None:
        return stop
    rsa_keysize = _rsa_keysize(setup, tpm2, out)
    if rsa_keysize is None:
        return 1
    key, key_kind = state_key(setup)
    if key_kind == "passphrase":
        out.info("  The TPM's state will be encrypted using a key derived from a passphrase.")
    elif key_kind == "key":
        out.info("  The TPM's state will be encrypted with a provided key.")
    # 0.7.1: --create-platform-cert implies --createek, not --create-ek-cert (its help
    # says otherwise); a TPM 1.2 gets a platform certificate only with its EK's.
    ek_cert = setup.has("create-ek-cert")
    base = {
        "state_dir": str(location),
        "backend": backend,
        "tpm2": tpm2,
        "key": key.hex() if key else None,
    }
    out.info(
        f"Starting vTPM {'reconfiguration' if reconfigure else 'manufacturing'} as "
        f"{_who()} @ {_now()}"
    )
    # swtpm_setup 0.7.1 says this to stdout (even with --logfile) once its swtpm serves
    sys.stdout.write("TPM is listening on Unix socket.\n")
    sys.stdout.flush()
    made: dict[str, Any] = {"eks": [], "templates": []}
    if not reconfigure:
        made = _child(
            {
                **base,
                **_ownership(setup, tpm2),
                "phase": "create",
                "ek": ek_cert
                or setup.has("create-platform-cert")
                or setup.has("createek")
                or (setup.has("take-ownership") and not tpm2),
                "spk": setup.has("create-spk"),
                "ecc": setup.has("ecc"),
                "rsa_keysize": rsa_keysize,
                "allow_signing": setup.has("allow-signing"),
                "decryption": setup.has("decryption"),
            }
        )
    try:
        if tpm2:
            certs = _certificates(setup, config, made, out, ek_cert)
        else:
            certs = _certificates12(setup, config, made, out, ek_cert)
        banks = _pcr_banks(setup, config) if tpm2 else None
        done = _child(
            {
                **base,
                "phase": "finish",
                "certs": [[index, der.hex()] for index, der in certs],
                "lock": made.get("templates", []),
                "lock_nvram": setup.has("lock-nvram"),
                "pcr_banks": banks,
            }
        )
    except BaseException:
        if not reconfigure:
            _remove_state(state)
        raise
    if banks is not None and tpm2:
        out.info(
            f"Successfully activated PCR banks {','.join(done['active'])} "
            f"among {','.join(done['available'])}."
        )
    if not tpm2:
        _report12(setup, made, certs, out)
        certs = [(index, bytes.fromhex(der)) for index, der in done["certs"]]
    _write_cert_files(setup, made, certs)
    out.info("Successfully authored TPM state.")
    out.info(f"Ending vTPM manufacturing @ {_now()}")  # also after --reconfigure, as 0.7.1
    return 0


def _certificates(
    setup: Setup, config: dict[str, str], made: dict[str, Any], out: Output, ek_cert: bool
) -> list[tuple[int, bytes]]:
    """(NV index, DER) of each certificate, reported in swtpm_setup's order."""
    if made.get("spk"):
        out.info(f"Successfully created storage primary key with handle {made['spk']}.")
    certs: list[tuple[int, bytes]] = []
    platform = setup.has("create-platform-cert")
    issuer = _issuer(setup, config, out) if ek_cert or platform else None
    with _workdir() as workdir:
        for ek in made.get("eks", []):
            name = _ek_name(ek)
            out.info(f"Successfully created {name} EK with handle 0x{ek['handle']:x}.")
            if "template_index" in ek:
                index = ek["template_index"]
                out.info(f"Successfully created NVRAM area 0x{index:x} for {name} EK template.")
            if issuer is None:
                continue
            info = made["tpm_info"]
            pending = []
            if ek_cert:
                pending.append(
                    (ek["cert_index"], issuer.issue("ek", ek, info, workdir), f"{name} EK")
                )
            if platform and all(i != PLATFORM_INDEX for i, _ in certs):
                pder = issuer.issue("platform", ek, info, workdir)
                pending.append((PLATFORM_INDEX, pder, "platform"))
            for index, der, what in pending:
                certs.append((index, der))
                out.info(f"Successfully created NVRAM area 0x{index:x} for {what} certificate.")
    return certs


def _certificates12(
    setup: Setup, config: dict[str, str], made: dict[str, Any], out: Output, ek_cert: bool
) -> list[tuple[int, bytes]]:
    """A TPM 1.2's EK and platform certificates (DER), after swtpm_setup's lines on the EK."""
    certs: list[tuple[int, bytes]] = []
    for ek in made.get("eks", []):
        out.info("Successfully created EK.")
        if made.get("owned"):
            out.info("Successfully took ownership of the TPM.")
        if not ek_cert:
            continue
        issuer = _issuer(setup, config, out)
        with _workdir() as workdir:
            certs.append((ek["cert_index"], issuer.issue("ek", ek, made["tpm_info"], workdir)))
            if setup.has("create-platform-cert"):
                der = issuer.issue("platform", ek, made["tpm_info"], workdir)
                certs.append((ek["platform_index"], der))
    return certs


def _report12(
    setup: Setup, made: dict[str, Any], certs: list[tuple[int, bytes]], out: Output
) -> None:
    """What a TPM 1.2's second phase did, in swtpm_setup's words."""
    for index, _ in certs:
        what = "EK" if index == made["eks"][0]["cert_index"] else "Platform"
        out.info(f"Successfully created NVRAM area for {what} certificate.")
    if setup.has("lock-nvram"):
        out.info("Successfully locked NVRAM access.")


def _write_cert_files(setup: Setup, made: dict[str, Any], certs: list[tuple[int, bytes]]) -> None:
    from vtpmctl.store.atomic import write_atomic

    target = setup.values.get("write-ek-cert-files")
    if not target:
        return
    by_index = dict(certs)
    for ek in made.get("eks", []):
        der = by_index.get(ek["cert_index"])
        if der is not None:
            path = Path(target) / _cert_file_name(ek)
            try:
                write_atomic(path, der, CERT_FILE_MODE)
            except OSError as exc:
                raise SwtpmSetupError(f"Could not write {path}: {exc.strerror}") from None


def _runas(user: str) -> None:
    if os.geteuid() != 0:
        raise SwtpmSetupError("Need to be root to use --runas.")
    try:
        entry = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    except KeyError:
        raise SwtpmSetupError(f"User '{user}' does not exist.") from None
    os.initgroups(entry.pw_name, entry.pw_gid)
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)


def create_config_files(option: str, out: Output) -> int:
    """Per-user swtpm_setup.conf, swtpm-localca.conf and .options (swtpm_localca's layout)."""
    words = {w for w in option.split(",") if w}
    unknown = words - {"overwrite", "root", "skip-if-exist"}
    if unknown:
        raise SwtpmSetupError(f"Unknown option '{sorted(unknown)[0]}' for --create-config-files.")
    if os.geteuid() == 0 and "root" not in words:
        raise SwtpmSetupError(
            "Requiring the 'root' flag since the configuration files will shadow those in /etc."
        )
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    state = base / "var" / "lib" / "swtpm-localca"
    uname = os.uname()
    files = {
        base / "swtpm_setup.conf": (
            f"create_certs_tool = {shutil.which('swtpm_localca') or '/usr/bin/swtpm_localca'}\n"
            f"create_certs_tool_config = {base / 'swtpm-localca.conf'}\n"
            f"create_certs_tool_options = {base / 'swtpm-localca.options'}\n"
            "# PCR banks activated when --pcr-banks is not given (comma-separated)\n"
            f"active_pcr_banks = {DEFAULT_PCR_BANKS}\n"
        ),
        base / "swtpm-localca.conf": (
            f"statedir = {state}\nsigningkey = {state / 'signkey.pem'}\n"
            f"issuercert = {state / 'issuercert.pem'}\ncertserial = {state / 'certserial'}\n"
        ),
        base / "swtpm-localca.options": (
            f"--platform-manufacturer {uname.sysname}\n"
            f"--platform-version {uname.version.replace(' ', '_')}\n"
            f"--platform-model {uname.sysname}\n"
        ),
    }
    existing = [p for p in files if p.exists()]
    if existing and "overwrite" not in words:
        if "skip-if-exist" in words:
            return 0
        raise SwtpmSetupError(f"File {existing[0]} already exists. Refusing to overwrite.")
    from vtpmctl.store.atomic import write_atomic

    base.mkdir(parents=True, exist_ok=True)
    state.mkdir(mode=0o755, parents=True, exist_ok=True)  # swtpm_localca's CA goes there
    for path, text in files.items():
        write_atomic(path, text.encode(), 0o644)
        out.info(f"Writing {path}.")
    return 0


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run one swtpm_setup command line; 0 on success, 1 on failure."""
    args = list(sys.argv[1:] if argv is None else argv)
    name = prog or (sys.argv[0] if os.path.basename(sys.argv[0]) == "swtpm_setup" else "")
    out = Output()
    try:
        setup = parse(args, name or "swtpm_setup")
        if "print-capabilities" in setup.flags:
            sys.stdout.write(capabilities())
            return 0
        if "runas" in setup.values:
            _runas(setup.values["runas"])
        if "logfile" in setup.values:
            out.open(setup.values["logfile"])
        if "create-config-files" in setup.values or "create-config-files" in setup.flags:
            return create_config_files(setup.values.get("create-config-files", ""), out)
        return manufacture(setup, out)
    except SystemExit as exc:
        return int(exc.code or 0)
    except (SwtpmSetupError, UsageError) as exc:
        out.error(str(exc))
        return 1
    except VtpmctlError as exc:
        out.error(f"Error: {exc}")
        return 1
    finally:
        if out.log is not None:
            out.log.close()


if __name__ == "__main__":
    sys.exit(main())
