"""The state inspector against real libtpms: validation and decoding in a child process."""

from __future__ import annotations

import hashlib
import sys

import pytest
from tpm_factory import make_state

from vtpmctl.engine import tpm2 as t
from vtpmctl.usecases.inspect import inspect_blobs

NV_OWNER = 0x01500001
NV_AUTH = 0x01500002
NV_PW = 0x01500003
NV_EMPTY = 0x01500004


@pytest.fixture(scope="module")
def state() -> dict[str, bytes]:
    auth_attrs = t.NvAttr.AUTHWRITE | t.NvAttr.AUTHREAD | t.NvAttr.NO_DA
    return make_state(
        {
            "persistent": [0x81000001, 0x81000002],
            "nv": [
                {"index": NV_OWNER, "size": 8, "data": b"abcdefgh".hex()},
                {"index": NV_AUTH, "size": 4, "data": b"wxyz".hex(), "attrs": auth_attrs},
                {
                    "index": NV_PW,
                    "size": 4,
                    "data": b"pppp".hex(),
                    "attrs": auth_attrs,
                    "auth": b"secret".hex(),
                },
                {"index": NV_EMPTY, "size": 16},
            ],
            "volatile": True,
        }
    )


def test_caller_never_loads_libtpms(state: dict[str, bytes]) -> None:
    """libtpms may only ever be mapped into the throwaway child."""
    import subprocess

    code = (
        "import sys; from vtpmctl.usecases.inspect import inspect_blobs; "
        "r = inspect_blobs({'permanent': sys.stdin.buffer.read()}, tpm2=True, "
        "describe=True); assert r.ok, r; "
        "assert 'libtpms' not in open('/proc/self/maps').read(); print('fine')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=state["permanent"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert out.stdout.strip() == b"fine", out.stderr


def test_validate_only(state: dict[str, bytes]) -> None:
    res = inspect_blobs({"permanent": state["permanent"]}, tpm2=True)
    assert res.ok and res.error is None
    assert res.validate == {"permanent": 0}
    assert res.persistent is None and res.nv is None


def test_describe(state: dict[str, bytes]) -> None:
    res = inspect_blobs({"permanent": state["permanent"]}, tpm2=True, describe=True)
    assert res.ok, res
    assert res.persistent is not None and res.nv is not None
    assert sorted(res.persistent) == ["0x81000001", "0x81000002"]
    # Same template in the same hierarchy: the same key, so the same Name.
    names = set(res.persistent.values())
    assert len(names) == 1 and next(iter(names)).startswith("000b")
    nv = res.nv
    assert sorted(nv) == [f"0x{i:08x}" for i in (NV_OWNER, NV_AUTH, NV_PW, NV_EMPTY)]
    assert nv[f"0x{NV_OWNER:08x}"]["sha256"] == hashlib.sha256(b"abcdefgh").hexdigest()
    assert nv[f"0x{NV_OWNER:08x}"]["size"] == 8
    attrs = nv[f"0x{NV_OWNER:08x}"]["attributes"]
    assert isinstance(attrs, int) and attrs & t.NvAttr.WRITTEN
    assert nv[f"0x{NV_AUTH:08x}"]["sha256"] == hashlib.sha256(b"wxyz").hexdigest()
    assert nv[f"0x{NV_PW:08x}"]["sha256"] is None  # needs a password we do not have
    assert nv[f"0x{NV_EMPTY:08x}"]["sha256"] is None  # never written


def test_describe_with_volatile_resumes(state: dict[str, bytes]) -> None:
    res = inspect_blobs(state, tpm2=True, describe=True)
    assert res.ok, res
    assert res.validate == {"permanent": 0, "volatile": 0}
    assert res.persistent is not None and len(res.persistent) == 2


def test_truncated_permanent() -> None:
    perm = make_state()["permanent"]
    res = inspect_blobs({"permanent": perm[:-40]}, tpm2=True, describe=True)
    assert not res.ok
    assert res.validate["permanent"] != 0
    assert res.error is not None and "power on" in res.error
    assert res.persistent is None


def test_volatile_of_another_tpm(state: dict[str, bytes]) -> None:
    other = make_state()["permanent"]
    res = inspect_blobs({"permanent": other, "volatile": state["volatile"]}, tpm2=True)
    assert not res.ok
    assert res.validate["permanent"] == 0 and res.validate["volatile"] != 0


def test_missing_permanent_is_never_manufactured(state: dict[str, bytes]) -> None:
    res = inspect_blobs({"volatile": state["volatile"]}, tpm2=True, describe=True)
    assert not res.ok
    assert res.error is not None and "no permanent state" in res.error
    assert res.persistent is None


def test_garbage_and_bad_kinds() -> None:
    res = inspect_blobs({"permanent": b"\x00" * 100}, tpm2=True, describe=True)
    assert not res.ok and res.validate["permanent"] != 0
    with pytest.raises(ValueError, match="unknown blob kinds"):
        inspect_blobs({"permall": b"x"}, tpm2=True)


def test_timeout(state: dict[str, bytes]) -> None:
    res = inspect_blobs({"permanent": state["permanent"]}, tpm2=True, timeout=0.001)
    assert not res.ok and res.error is not None and "within" in res.error
