"""vtpmctl.store.records: dataclasses to JSON and back, with every value's type checked."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from vtpmctl.store import records
from vtpmctl.store.instances import InstanceConfig, InstanceError, InstanceMeta
from vtpmctl.usecases.inspect import InspectResult


class Bad(Exception):
    pass


class Colour(enum.StrEnum):
    RED = "red"
    BLUE = "blue"


@dataclass
class Inner:
    n: int
    tag: str = field(default="a", metadata=records.one_of("a", "b"))


@dataclass
class Outer:
    name: str
    flag: bool = False
    colour: Colour = Colour.RED
    size: Literal["s", "m"] = "s"
    note: str | None = None
    inner: Inner = field(default_factory=lambda: Inner(0))
    items: list[Inner] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    anything: dict[str, object] = field(default_factory=dict)
    legacy: bool = field(default=True, metadata=records.when_absent(False))
    kind: str = field(default="x", metadata=records.required())


def read(data: Any, **kw: Any) -> Outer:
    return records.from_json(Outer, data, Bad, **kw)


def test_round_trip_in_field_order() -> None:
    rec = Outer(
        "a",
        True,
        Colour.BLUE,
        "m",
        "hi",
        Inner(3, "b"),
        [Inner(1)],
        {"x": 1},
        {"y": [1, None]},
        True,
        "k",
    )
    obj = records.to_json(rec)
    assert list(obj) == [
        "name",
        "flag",
        "colour",
        "size",
        "note",
        "inner",
        "items",
        "counts",
        "anything",
        "legacy",
        "kind",
    ]
    assert json.dumps(obj["colour"]) == '"blue"' and obj["items"] == [{"n": 1, "tag": "a"}]
    assert read(json.loads(json.dumps(obj))) == rec
    assert read(json.loads(json.dumps(obj)), exact=True) == rec


def test_absent_keys() -> None:
    assert read({"name": "a", "kind": "k"}) == Outer("a", legacy=False, kind="k")
    with pytest.raises(Bad, match="field 'kind' is missing"):
        read({"name": "a"})
    with pytest.raises(Bad, match="field 'name' is missing"):
        read({"kind": "k"})
    assert read({"name": "a", "kind": "k", "unknown": 1}).name == "a"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"flag": "no"}, "field 'flag' is str, not bool"),
        ({"flag": 0}, "field 'flag' is int, not bool"),
        ({"name": 5}, "field 'name' is int, not str"),
        ({"colour": "green"}, "field 'colour' is 'green', not one of red, blue"),
        ({"size": "l"}, "field 'size' is 'l', not one of s, m"),
        ({"note": 1}, "field 'note' is int, not str"),
        ({"inner": []}, "field 'inner' is not a JSON object"),
        ({"inner": {"n": True}}, "field 'inner.n' is bool, not int"),
        ({"inner": {"n": 1, "tag": "c"}}, "field 'inner.tag' is 'c', not one of a, b"),
        ({"items": {}}, "field 'items' is dict, not list"),
        ({"items": [{"n": "1"}]}, r"field 'items\[0\].n' is str, not int"),
        ({"counts": {"x": "1"}}, r"field \"counts\['x'\]\" is str, not int"),
        ({"legacy": None}, "field 'legacy' is NoneType, not bool"),
    ],
)
def test_wrong_types_are_errors(data: dict[str, Any], message: str) -> None:
    with pytest.raises(Bad, match=message):
        read({"name": "a", "kind": "k", **data})


def test_exact_keys() -> None:
    with pytest.raises(Bad, match=r"unexpected keys \['z'\], missing keys \['anything'"):
        read({"name": "a", "kind": "k", "z": 1}, exact=True)
    full = records.to_json(Outer("a"))
    del full["inner"]["tag"]
    with pytest.raises(Bad, match=r"field 'inner': unexpected keys \[\], missing keys \['tag'\]"):
        read(full, exact=True)
    assert read({**records.to_json(Outer("a")), "v": 1}, exact=True, handled=("v",)) == Outer("a")
    with pytest.raises(Bad, match="it is not a JSON object"):
        read([], exact=True)


# ---------------------------------------------------------------- the records that use it


def test_config_types_are_checked(tmp_path: Path) -> None:
    where = tmp_path / "config.json"
    good = {"name": "vm", "tpm": "2.0", "transport": "socket"}
    assert InstanceConfig.from_json(good, where) == InstanceConfig("vm", ek=False)
    for bad in (
        {"encrypted": "no"},
        {"ek": 1},
        {"tpm": "3.0"},
        {"transport": "usb"},
        {"tpm": None},
        {"name": ["vm"]},
    ):
        with pytest.raises(InstanceError, match=f"^{where}: field .*; restore it from a backup"):
            InstanceConfig.from_json({**good, **bad}, where)
    for key in good:
        with pytest.raises(InstanceError, match=f"field '{key}' is missing"):
            InstanceConfig.from_json({k: v for k, v in good.items() if k != key}, where)


def test_meta_types_are_checked(tmp_path: Path) -> None:
    where = tmp_path / "meta.json"
    assert InstanceMeta.from_json({"created": "x", "other": 1}, where) == InstanceMeta(created="x")
    for bad in ({"cipher": 256}, {"ek_fingerprints": ["rsa2048"]}, {"created": None}):
        with pytest.raises(InstanceError, match="restore it from a backup"):
            InstanceMeta.from_json(bad, where)


def test_inspect_answer_types_are_checked() -> None:
    good = {"ok": True, "validate": {"permanent": 0}}
    assert InspectResult.from_json(good) == InspectResult(True, {"permanent": 0})
    for bad in ({"ok": "yes"}, {"validate": {"permanent": "0"}}, {"log": "x"}, {"nv": []}):
        with pytest.raises(ValueError):
            InspectResult.from_json({**good, **bad})
    with pytest.raises(ValueError, match="field 'ok' is missing"):
        InspectResult.from_json({"validate": {}})


def test_unsupported_annotations_are_a_programming_error() -> None:
    @dataclass
    class Odd:
        either: int | str

    with pytest.raises(TypeError, match="records cannot read 'either'"):
        records.from_json(Odd, {"either": 1}, Bad)
