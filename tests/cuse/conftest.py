"""The CUSE suite runs in a VM with /dev/cuse (tests/cuse/run.sh); elsewhere it skips."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def guest_tmp() -> Iterator[Path]:
    """A directory in the guest's own /tmp: unix sockets cannot live on the 9p share."""
    with tempfile.TemporaryDirectory(prefix="vtpm-cuse-", dir="/tmp") as d:
        yield Path(d)
