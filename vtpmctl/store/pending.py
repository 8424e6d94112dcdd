"""Operations a crash can leave half done, settled in one place.

A key rotation and a snapshot restore each decide with a marker file and are
replayed from it. Every command that takes an instance's state lock calls
``settle`` before it reads or writes the state, so nothing ever runs on (or
snapshots, exports, re-encrypts) a state that a decided operation is about to
replace.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vtpmctl.store import instance_keys
from vtpmctl.store.instances import InstancePaths
from vtpmctl.store.snapshots import settle_restore
from vtpmctl.store.statedir import StateDir


@dataclass
class Settled:
    rotation: str | None = None  # "completed", "rolled back" or None
    notes: list[str] = field(default_factory=list)  # for the user, one line each


def settle(paths: InstancePaths, tpm2: bool) -> Settled:
    """Finish (or roll back) what a crash interrupted; the caller holds the state lock.

    The rotation goes first: a restore is only ever staged after the rotation
    before it was settled, so its staged files are under the current key.
    """
    out = Settled(rotation=instance_keys.recover(paths, tpm2))
    if out.rotation == "completed":
        out.notes.append("completed the interrupted key rotation")
    note = settle_restore(StateDir(paths.state_dir, tpm2=tpm2))
    if note is not None:
        out.notes.append(note)
    return out
