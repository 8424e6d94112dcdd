"""TPM2_Startup and TPM2_Shutdown as bytes: the TPM 2.0 commands the engine sends itself.

Apart from ``commands`` (which re-exports them) so that the engine, and so
every vTPM daemon the zygote forks, does not import the other command
builders, their dataclasses and hashlib (docs/architecture.md, "The zygote").
"""

from __future__ import annotations

import struct

from vtpmctl.engine.tpm2.constants import CC, HEADER_SIZE, ST_NO_SESSIONS, SU_CLEAR


def _no_sessions(cc: CC, params: bytes) -> bytes:
    """``marshal.build_command`` for a command with no handles and no sessions."""
    return struct.pack(">HII", ST_NO_SESSIONS, HEADER_SIZE + len(params), cc) + params


def build_startup(startup_type: int = SU_CLEAR) -> bytes:
    return _no_sessions(CC.Startup, struct.pack(">H", startup_type))


def build_shutdown(shutdown_type: int = SU_CLEAR) -> bytes:
    return _no_sessions(CC.Shutdown, struct.pack(">H", shutdown_type))
