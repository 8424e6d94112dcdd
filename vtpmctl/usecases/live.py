"""A named instance's daemon, seen through its control channel.

The one way to open a control client for an instance (its socket or its
CUSE device, as its config says) and the one way to read a plaintext state
blob from it. Nothing is connected until the first command.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vtpmctl.device.client.control import DEFAULT_TIMEOUT, ControlClient
from vtpmctl.device.client.target import instance_target, open_client

if TYPE_CHECKING:
    from vtpmctl.model import BlobKind
    from vtpmctl.store.blob import AesKey
    from vtpmctl.store.instances import Instance


def control_path(inst: Instance) -> str:
    """The control channel of the instance: its CUSE device or its control socket."""
    return instance_target(inst).path or ""


def instance_client(
    inst: Instance, *, timeout: float = DEFAULT_TIMEOUT, read_only: bool = False
) -> ControlClient:
    """A ControlClient for the instance's daemon, whether or not it is running.

    ``read_only``: only commands the daemon's admin endpoint answers will be sent
    (queries, the permanent state), so it is used, and answers while a
    hypervisor holds the control channel.
    """
    return open_client(instance_target(inst, read_only), timeout=timeout)


def read_state(
    client: ControlClient,
    kind: BlobKind,
    *,
    state_key: AesKey | None,
    migration_key: AesKey | None,
) -> bytes:
    """One blob as plain libtpms state; b"" if there is none.

    The daemon removes the state key's encryption when asked; the migration
    key's stays, and is removed here. Raises BlobError when it cannot be.
    """
    from vtpmctl.device.protocol import BlobType
    from vtpmctl.store.blob import unwrap_transfer

    flags, blob = client.get_state(BlobType.of(kind), decrypted=True)
    if not blob:
        return b""
    return unwrap_transfer(
        blob, state_flags=flags, state_key=state_key, migration_key=migration_key
    )
