"""The domain words, declared once: TPM family, transport, blob kind, key format.

Each is a ``StrEnum`` whose values are the words users type and files hold
today, so ``str(x)`` and JSON stay byte-identical; the other spellings are
properties. Numbers that belong to a protocol (ptm blob types in
``device.protocol``, libtpms' enums in ``engine.libtpms``) are mapped from
these enums in those modules, once each.

This module is at the bottom of the layers: it imports nothing from vtpmctl.
"""

from enum import StrEnum


class TpmFamily(StrEnum):
    """Which TPM: the value is the command-line word (``--tpm 2|1.2``)."""

    TPM2 = "2"
    TPM12 = "1.2"

    @classmethod
    def of(cls, tpm2: bool) -> "TpmFamily":
        """The family of a ``tpm2`` flag, as configs and options hold it."""
        return cls.TPM2 if tpm2 else cls.TPM12

    @classmethod
    def from_version(cls, version: str) -> "TpmFamily":
        """The family of a ``"2.0"``/``"1.2"`` record field; ValueError otherwise."""
        for family in cls:
            if family.version == version:
                return family
        raise ValueError(f"unknown TPM version {version!r}; expected 2.0 or 1.2")

    @property
    def tpm2(self) -> bool:
        return self is TpmFamily.TPM2

    @property
    def version(self) -> str:
        """The spelling of config.json, meta.json and bundle manifests: "2.0" or "1.2"."""
        return "2.0" if self is TpmFamily.TPM2 else "1.2"

    @property
    def state_prefix(self) -> str:
        """The prefix of state file names in a state dir (swtpm's)."""
        return "tpm2-00." if self is TpmFamily.TPM2 else "tpm-00."

    @property
    def temp_prefix(self) -> str:
        """The prefix of a state file being written (swtpm's)."""
        return "TMP2-00." if self is TpmFamily.TPM2 else "TMP-00."


class Transport(StrEnum):
    """How a named vTPM is reached: control/data sockets, or a CUSE device."""

    SOCKET = "socket"
    CUSE = "cuse"


# The kernel takes a CUSE DEVNAME of vtpm- and at most this many more characters.
CUSE_NAME_MAX = 63


class BlobKind(StrEnum):
    """A TPM state blob: the value is the word of ``--type``, JSON records and bundles."""

    PERMANENT = "permanent"
    VOLATILE = "volatile"
    SAVESTATE = "savestate"

    @classmethod
    def from_file_name(cls, name: str) -> "BlobKind":
        """The kind stored in a state file named ``<prefix><name>``; ValueError otherwise."""
        for kind in cls:
            if kind.file_name == name:
                return kind
        raise ValueError(f"unknown state name {name!r}")

    @property
    def file_name(self) -> str:
        """The state file's name after its prefix (and libtpms' name of the blob)."""
        return _FILE_NAMES[self]


_FILE_NAMES = {
    BlobKind.PERMANENT: "permall",
    BlobKind.VOLATILE: "volatilestate",
    BlobKind.SAVESTATE: "savestate",
}

# The state file names in the order of BlobKind (permanent first).
STATE_FILE_NAMES = tuple(kind.file_name for kind in BlobKind)


class SwtpmProgram(StrEnum):
    """swtpm's programs that vtpmctl answers as: the value is the program's name.

    One multi-call entry point (``vtpmctl.compat``) serves them all and picks
    the program by the name it was started as; ``vtpmctl swtpm-compat
    install`` writes one launcher per name.
    """

    SWTPM = "swtpm"
    SWTPM_SETUP = "swtpm_setup"
    SWTPM_IOCTL = "swtpm_ioctl"


class KeyFormat(StrEnum):
    """How a key file is read: ``auto`` guesses between hex and binary."""

    AUTO = "auto"
    HEX = "hex"
    BINARY = "binary"
    PASSPHRASE = "passphrase"


# swtpm's --key/--migration-key value (file=, fd=, pwdfile=, pwdfd= and options),
# which vtpmctl's --key/--migration-key take too; parsed by vtpmctl.store.keys.
KEY_SPEC_METAVAR = "file=F|fd=N|pwdfile=F|pwdfd=N[,format=,mode=,kdf=,remove]"
KEY_SPEC_HELP = (
    "as swtpm's --key: a hex or binary key, or a passphrase (pwdfile=/pwdfd=), from a file "
    "or an inherited descriptor; mode=aes-128-cbc|aes-256-cbc, kdf=pbkdf2|sha512"
)


class OnShutdown(StrEnum):
    """What CMD_SHUTDOWN does to a daemon (``--on-shutdown``).

    ``exit`` is swtpm's way: the TPM is saved and the process ends. With
    ``power-off`` the TPM is saved and powered off like a physical TPM at the
    end of a VM run, and the daemon keeps its endpoint for the next run (whose
    CMD_INIT powers it on again); a signal (``vtpmctl stop``) still ends it.
    """

    EXIT = "exit"
    POWER_OFF = "power-off"
