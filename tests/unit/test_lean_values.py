"""vtpmctl.frozen and vtpmctl.fspath: what dataclasses and pathlib gave the daemon's modules."""

from __future__ import annotations

import copy
import itertools
import pickle
from pathlib import Path

import pytest

from vtpmctl.device.server.sockets import Endpoint
from vtpmctl.fspath import clean, join, name, parent
from vtpmctl.model import KeyFormat
from vtpmctl.store.access import Access
from vtpmctl.store.blob import AesKey, BlobHeader
from vtpmctl.store.keys import KeySource

# Every spelling of up to five pieces: roots, repeated slashes, ".", "..", spaces.
SPELLINGS = sorted(
    {
        "".join(t)
        for n in range(1, 6)
        for t in itertools.product(["", "/", "a", ".", "..", "b c"], repeat=n)
    }
)


def test_fspath_spells_as_pathlib() -> None:
    wrong = []
    for text in SPELLINGS:
        path = Path(text)
        for what, got, want in (
            ("clean", clean(text), str(path)),
            ("clean of a Path", clean(path), str(path)),
            ("parent", parent(text), str(path.parent)),
            ("name", name(text), path.name),
            ("join", join(text, "x", "y"), str(Path(text, "x", "y"))),
            ("join absolute", join(text, "/abs"), str(Path(text, "/abs"))),
        ):
            if got != want:
                wrong.append(f"{what}({text!r}) = {got!r}, pathlib: {want!r}")
    assert not wrong, wrong[:10]


def test_frozen_equality_hash_repr_replace() -> None:
    ep = Endpoint("unix", path="/run/x")
    assert ep == Endpoint("unix", "/run/x")
    assert ep != Endpoint("unix", "/run/y")
    assert ep != ("unix", "/run/x", "127.0.0.1", 0, 0o600, -1)
    assert len({ep, Endpoint("unix", path="/run/x")}) == 1
    assert repr(ep) == (
        "Endpoint(kind='unix', path='/run/x', host='127.0.0.1', port=0, mode=384, gid=-1)"
    )
    changed = ep.replace(mode=0o660, gid=5)
    assert (changed.mode, changed.gid, changed.path) == (0o660, 5, "/run/x")
    assert ep.mode == 0o600  # the original is untouched
    with pytest.raises(TypeError, match="no field 'nope'"):
        ep.replace(nope=1)
    with pytest.raises(AttributeError, match="frozen"):
        ep.port = 1  # type: ignore[misc]
    with pytest.raises(AttributeError, match="frozen"):
        del ep.port
    assert Access() == Access(None, 0o600, 0o700)
    assert BlobHeader(2, 1, 10, 9, 50).totlen == 50


def test_frozen_values_copy_and_pickle() -> None:
    values = [
        Endpoint("tcp", host="::1", port=2321),
        Access("kvm", 0o660, 0o710),
        AesKey(bytes(16)),
        BlobHeader(2, 1, 10, 9, 50),
        KeySource(path="/k", kind=KeyFormat.HEX, remove=True),
    ]
    for value in values:
        for again in (copy.copy(value), copy.deepcopy(value), pickle.loads(pickle.dumps(value))):
            assert again == value and type(again) is type(value)


def test_aes_key_keeps_its_secret_and_compares_by_value() -> None:
    key = AesKey(bytes(range(32)))
    assert repr(key) == str(key) == "AesKey(256-bit)"
    assert key == AesKey(bytearray(range(32)))
    assert hash(key) == hash(AesKey(bytes(range(32))))
    with pytest.raises(ValueError, match="16 or 32 bytes"):
        AesKey(b"short")
    with pytest.raises(TypeError):
        AesKey("not bytes")  # type: ignore[arg-type]


def test_key_source_path_spelled_as_pathlib() -> None:
    assert KeySource(path=Path("/k//x/")).path == "/k/x"
    assert KeySource(path="rel/./k").path == "rel/k"
    assert KeySource(fd=3).path is None
