"""Option values shared by several commands, declared once so they never drift."""

from enum import StrEnum


class TpmFamily(StrEnum):
    TPM2 = "2"
    TPM12 = "1.2"


class TransportKind(StrEnum):
    SOCKET = "socket"
    CUSE = "cuse"


class KeyFormat(StrEnum):
    AUTO = "auto"
    HEX = "hex"
    BINARY = "binary"
    PASSPHRASE = "passphrase"
