"""TPM2_Startup and TPM2_Shutdown as bytes: the TPM 2.0 commands the engine sends itself.

Apart from ``commands`` (which re-exports them) so that the engine, and so
every vTPM daemon the zygote forks, does not import the other command
builders, their dataclasses and hashlib (docs/architecture.md, "The zygote").
The command header is written here too, by ``frame``, which
``marshal.build_command`` uses for every other command.
"""

from __future__ import annotations

import struct

from vtpmctl.engine.tpm2.constants import CC, HEADER_SIZE, ST_NO_SESSIONS, SU_CLEAR


def frame(tag: int, cc: int, body: bytes) -> bytes:
    """A whole command: the header (tag, total size, command code), then ``body``."""
    return struct.pack(">HII", tag, HEADER_SIZE + len(body), cc) + body


def build_startup(startup_type: int = SU_CLEAR) -> bytes:
    return frame(ST_NO_SESSIONS, CC.Startup, struct.pack(">H", startup_type))


def build_shutdown(shutdown_type: int = SU_CLEAR) -> bytes:
    return frame(ST_NO_SESSIONS, CC.Shutdown, struct.pack(">H", shutdown_type))
