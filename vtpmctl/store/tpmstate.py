"""swtpm's ``key=value,flag,…`` option values and its ``--tpmstate`` location.

One parser for both sides: vtpmctl's compatible ``swtpm`` (which reports a
problem as swtpm does) and the commands that take a state location in swtpm's
own syntax (``snapshot restore --tpmstate``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vtpmctl.errors import SwtpmOptionError


def parse_values(text: str, option: str, keys: dict[str, str]) -> dict[str, str]:
    """``key=value,flag,…``; ``keys`` maps each allowed key to "value" or "flag"."""
    out: dict[str, str] = {}
    for item in filter(None, text.split(",")):
        name, sep, value = item.partition("=")
        kind = keys.get(name)
        if kind is None:
            raise SwtpmOptionError(f"Unknown parameter '{name}' for option --{option}")
        if kind == "value" and not sep:
            raise SwtpmOptionError(f"Missing value for parameter '{name}' of option --{option}")
        out[name] = value if sep else "true"
    return out


def int_value(values: dict[str, str], key: str, option: str, base: int = 10) -> int | None:
    if key not in values:
        return None
    try:
        return int(values[key], base)
    except ValueError:
        raise SwtpmOptionError(
            f"Invalid value '{values[key]}' for {key} of option --{option}"
        ) from None


def mode_value(values: dict[str, str], option: str, default: int) -> int:
    text = values.get("mode")
    if text is None:
        return default
    if not text.startswith("0"):
        raise SwtpmOptionError(
            f"mode for --{option} must be an octal number starting with '0': {text}"
        )
    mode = int_value(values, "mode", option, 8)
    assert mode is not None
    if mode > 0o777:
        raise SwtpmOptionError(f"mode {text} of --{option} has bits beyond 0777")
    return mode


def bool_value(values: dict[str, str], key: str, default: bool) -> bool:
    text = values.get(key)
    if text is None:
        return default
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise SwtpmOptionError(f"Invalid boolean '{text}' for {key}")


@dataclass
class TpmState:
    backend: str  # dir | file
    path: Path
    mode: int = 0o640
    lock: bool = True
    mode_given: bool = False  # mode= was on the command line (not swtpm's default)


def parse_tpmstate(text: str) -> TpmState:
    keys = {"dir": "value", "backend-uri": "value", "mode": "value", "lock": "flag"}
    keys.update(backup="flag", fsync="flag")
    values = parse_values(text, "tpmstate", keys)
    if "dir" in values and "backend-uri" in values:
        raise SwtpmOptionError("--tpmstate: give dir= or backend-uri=, not both")
    if "dir" in values:
        backend, path = "dir", values["dir"]
    elif "backend-uri" in values:
        uri = values["backend-uri"]
        scheme, sep, path = uri.partition("://")
        if not sep or scheme not in ("dir", "file"):
            raise SwtpmOptionError(f"Unsupported backend URI {uri}; use dir://PATH or file://PATH")
        backend = scheme
    else:
        raise SwtpmOptionError("--tpmstate needs dir= or backend-uri=")
    if not path:
        raise SwtpmOptionError("--tpmstate: the path is empty")
    if backend == "file" and ("backup" in values or "fsync" in values):
        raise SwtpmOptionError("--tpmstate: backup and fsync are for the dir:// backend only")
    return TpmState(
        backend,
        Path(path),
        mode=mode_value(values, "tpmstate", 0o640),
        lock=bool_value(values, "lock", backend == "dir"),
        mode_given="mode" in values,
    )
