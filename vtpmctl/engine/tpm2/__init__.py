"""TPM 2.0 command builders and parsers (see ``commands``)."""

from vtpmctl.engine.tpm2.commands import *  # noqa: F403
