"""The error tree and the domain words: one root, exit codes per branch, round trips."""

import importlib
import inspect
import pkgutil
import sys
import types

import pytest

import vtpmctl
from vtpmctl import errors
from vtpmctl.errors import (
    EXIT_FAILURE,
    EXIT_USAGE,
    LSB_UNKNOWN,
    DeviceError,
    EngineError,
    InstanceError,
    ServeError,
    StoreError,
    TpmResultError,
    UsageError,
    VtpmctlError,
)
from vtpmctl.model import STATE_FILE_NAMES, BlobKind, KeyFormat, TpmFamily, Transport

# Control flow that never reaches the user (each says so where it is defined).
PRIVATE = {"_InspectError", "ReplyError", "_Dropped"}


def _modules() -> list[str]:
    names = [vtpmctl.__name__]
    for info in pkgutil.walk_packages(vtpmctl.__path__, vtpmctl.__name__ + "."):
        if info.name.endswith("__main__"):
            continue
        names.append(info.name)
    return names


def _exception_classes() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for name in _modules():
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == module.__name__
            ):
                found[f"{module.__name__}.{attr}"] = obj
    return found


def test_every_exception_is_in_the_tree() -> None:
    classes = _exception_classes()
    assert len(classes) > 25
    outside = [
        name
        for name, cls in classes.items()
        if not issubclass(cls, VtpmctlError) and cls.__name__ not in PRIVATE
    ]
    assert outside == []


def test_every_exception_is_named_in_the_docstring() -> None:
    doc = errors.__doc__ or ""
    for name, cls in _exception_classes().items():
        if cls.__name__ not in PRIVATE:
            assert f" {cls.__name__} " in doc, name


@pytest.mark.parametrize(
    ("branch", "code"),
    [
        (VtpmctlError, EXIT_FAILURE),
        (UsageError, EXIT_USAGE),
        (DeviceError, EXIT_FAILURE),
        (TpmResultError, EXIT_FAILURE),
        (EngineError, EXIT_FAILURE),
        (ServeError, EXIT_FAILURE),
        (StoreError, EXIT_FAILURE),
        (InstanceError, EXIT_FAILURE),
    ],
)
def test_exit_codes_per_branch(branch: type[VtpmctlError], code: int) -> None:
    assert branch("x").exit_code == code


@pytest.mark.parametrize(
    ("exc", "code"),
    [(UsageError("no"), 2), (StoreError("no"), 1), (InstanceError("no"), 1), (ValueError("no"), 1)],
)
def test_cli_run_exits_with_the_error_code(
    exc: Exception, code: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from vtpmctl import cli

    def boom() -> int:
        raise exc

    module = types.ModuleType("vtpmctl_test_boom")
    module.boom = boom  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(cli, "_fast_plan", lambda args: (module.__name__, "boom", {}))
    assert cli.run(["caps", "x"]) == code
    assert capsys.readouterr().err == "vtpmctl: no\n"


def test_unknown_instance_is_lsb_unknown() -> None:
    from vtpmctl.errors import NoSuchInstance

    assert NoSuchInstance("x").lsb_code == LSB_UNKNOWN == 4
    assert errors.LSB_STATUS == {"running": 0, "stale": 1, "stopped": 3}


def test_our_messages_have_no_class_name() -> None:
    from vtpmctl.cli import _one_line

    assert _one_line(StoreError("cannot read f:  gone\n now")) == "cannot read f: gone now"
    assert _one_line(KeyError("k")).startswith("KeyError: ")


# ---------------------------------------------------------------- model


@pytest.mark.parametrize("kind", list(BlobKind))
def test_blob_kind_file_name_round_trip(kind: BlobKind) -> None:
    assert BlobKind.from_file_name(kind.file_name) is kind
    assert BlobKind(str(kind)) is kind


def test_blob_kind_words_and_files() -> None:
    assert [str(k) for k in BlobKind] == ["permanent", "volatile", "savestate"]
    assert STATE_FILE_NAMES == ("permall", "volatilestate", "savestate")
    with pytest.raises(ValueError):
        BlobKind.from_file_name("permanent")


@pytest.mark.parametrize("family", list(TpmFamily))
def test_tpm_family_round_trips(family: TpmFamily) -> None:
    assert TpmFamily.from_version(family.version) is family
    assert TpmFamily.of(family.tpm2) is family
    assert TpmFamily(str(family)) is family


def test_tpm_family_spellings() -> None:
    assert [str(f) for f in TpmFamily] == ["2", "1.2"]
    assert (TpmFamily.TPM2.version, TpmFamily.TPM12.version) == ("2.0", "1.2")
    assert (TpmFamily.TPM2.state_prefix, TpmFamily.TPM12.state_prefix) == ("tpm2-00.", "tpm-00.")
    assert (TpmFamily.TPM2.temp_prefix, TpmFamily.TPM12.temp_prefix) == ("TMP2-00.", "TMP-00.")
    with pytest.raises(ValueError):
        TpmFamily.from_version("2")


def test_transport_and_key_format_words() -> None:
    assert [str(t) for t in Transport] == ["socket", "cuse"]
    assert [str(k) for k in KeyFormat] == ["auto", "hex", "binary", "passphrase"]
