"""`vtpmctl caps` and `vtpmctl info`: what a TPM device can do and how it is set up.

The plain functions (``caps``, ``info``) do the work and are what the command
line calls; ``register`` adds their typer front ends. typer and rich are only
imported when needed, because scripts call these commands often.
"""

from vtpmctl.commands import decl
from vtpmctl.commands.output import print_json, print_rows
from vtpmctl.device.client.control import DEFAULT_TIMEOUT, ControlError
from vtpmctl.device.client.target import open_client, parse_target
from vtpmctl.device.protocol import Cap, ConfigFlag, InfoFlag, Res

# `typing` costs more to import than a control round trip; annotations only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    import typer

    from vtpmctl.device.client.control import ControlClient

FORMAT_VERSION = 1

# GET_INFO JSON members (as libtpms names them) → our --json keys.
INFO_KEYS = {
    "TPMSpecification": "tpm_specification",
    "TPMAttributes": "tpm_attributes",
    "TPMFeatures": "tpm_features",
    "RuntimeAlgorithms": "runtime_algorithms",
    "RuntimeCommands": "runtime_commands",
    "ActiveProfile": "active_profile",
    "AvailableProfiles": "available_profiles",
    "RuntimeAttributes": "runtime_attributes",
}
ALL_INFO = int(InfoFlag(sum(InfoFlag)))
BASIC_INFO = int(InfoFlag.TPMSPECIFICATION | InfoFlag.TPMATTRIBUTES | InfoFlag.TPMFEATURES)


def cap_names(caps: int) -> dict[str, bool]:
    """Every known capability, by lower-case name, with whether it is set."""
    return {c.name.lower(): bool(caps & c) for c in Cap if c.name}


def caps_data(target: str, caps: int) -> "dict[str, Any]":
    known = sum(Cap)
    return {
        "format_version": FORMAT_VERSION,
        "target": target,
        "caps": caps,
        "caps_hex": f"{caps:#010x}",
        "capabilities": cap_names(caps),
        "unknown_bits": caps & ~known,
    }


def caps(target: str, as_json: bool = False, timeout: float = DEFAULT_TIMEOUT) -> int:
    """Print the capability bits of TARGET."""
    where = parse_target(target, read_only=True)
    with open_client(where, timeout=timeout) as client:
        value = client.caps()
    data = caps_data(where.display, value)
    if as_json:
        print_json(data)
        return 0
    rows = [("capabilities", data["caps_hex"])]
    rows += [(name, "yes" if on else "no") for name, on in data["capabilities"].items()]
    if data["unknown_bits"]:
        rows.append(("unknown bits", f"{data['unknown_bits']:#x}"))
    print_rows(f"{where.display}", rows)
    return 0


def info_data(client: "ControlClient", target: str) -> "dict[str, Any]":
    """Everything the control channel tells about the TPM, as the --json object.

    Commands the peer does not advertise are not sent; their keys stay null.
    """
    value = client.caps()
    data: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "target": target,
        "caps": value,
        "running": None,
        "established": None,
    }
    data.update(dict.fromkeys(INFO_KEYS.values()))
    data.update(
        config_flags=None,
        state_key=None,
        migration_key=None,
        buffer_size=None,
        buffer_size_min=None,
        buffer_size_max=None,
    )
    if value & Cap.GET_TPMESTABLISHED:
        try:
            data["established"] = client.get_established()
            data["running"] = True
        except ControlError as exc:
            if exc.result != Res.BAD_ORDINAL:
                raise
            data["running"] = False  # answered only while the TPM runs
    if value & Cap.GET_INFO:
        try:
            info = client.get_info(ALL_INFO)
        except ControlError:
            info = client.get_info(BASIC_INFO)  # a peer that rejects flags it lacks
        for member, key in INFO_KEYS.items():
            data[key] = info.get(member)
    if value & Cap.GET_CONFIG:
        flags = client.get_config()
        data.update(
            config_flags=flags,
            state_key=bool(flags & ConfigFlag.FILE_KEY),
            migration_key=bool(flags & ConfigFlag.MIGRATION_KEY),
        )
    if value & Cap.SET_BUFFERSIZE:
        cur, low, high = client.set_buffersize(0)
        data.update(buffer_size=cur, buffer_size_min=low, buffer_size_max=high)
    return data


def info(target: str, as_json: bool = False, timeout: float = DEFAULT_TIMEOUT) -> int:
    """Print what TARGET reports about itself."""
    where = parse_target(target, read_only=True)
    with open_client(where, timeout=timeout) as client:
        data = info_data(client, where.display)
    if as_json:
        print_json(data)
        return 0
    print_rows(where.display, _info_rows(data))
    return 0


def _info_rows(data: "dict[str, Any]") -> list[tuple[str, str]]:
    def yn(v: bool | None, none: str = "unknown") -> str:
        return none if v is None else ("yes" if v else "no")

    rows = [
        ("running", yn(data["running"])),
        (
            "established",
            yn(
                data["established"],
                "unknown (TPM not running)" if data["running"] is False else "unknown",
            ),
        ),
    ]
    spec = data["tpm_specification"]
    if isinstance(spec, dict):
        rows.append(
            (
                "TPM family",
                f"{spec.get('family')} (level {spec.get('level')}, "
                f"revision {spec.get('revision')})",
            )
        )
    attrs = data["tpm_attributes"]
    if isinstance(attrs, dict):
        rows += [(k, str(v)) for k, v in attrs.items()]
    feats = data["tpm_features"]
    if isinstance(feats, dict):
        rows += [
            (k, ", ".join(map(str, v)) if isinstance(v, list) else str(v)) for k, v in feats.items()
        ]
    for key in (
        "runtime_algorithms",
        "runtime_commands",
        "active_profile",
        "available_profiles",
        "runtime_attributes",
    ):
        if data[key] is not None:
            import json

            rows.append((key.replace("_", " "), json.dumps(data[key], separators=(",", ":"))))
    rows += [("state key", yn(data["state_key"])), ("migration key", yn(data["migration_key"]))]
    if data["buffer_size"] is not None:
        rows.append(
            (
                "buffer size",
                f"{data['buffer_size']} (min {data['buffer_size_min']}, "
                f"max {data['buffer_size_max']})",
            )
        )
    rows.append(("capabilities", f"{data['caps']:#010x}"))
    return rows


# ---------------------------------------------------------------- command line

COMMANDS = (
    decl.Command(
        "caps",
        "vtpmctl.commands.query:caps",
        "Show the control-channel capabilities of a TPM (CMD_GET_CAPABILITY).",
        decl.TARGET,
        decl.JSON,
        timeout=True,
    ),
    decl.Command(
        "info",
        "vtpmctl.commands.query:info",
        "Show what a TPM reports: version, keys in use, buffer size, established bit.",
        decl.TARGET,
        decl.JSON,
        timeout=True,
    ),
)


def register(app: "typer.Typer") -> None:
    """Add `caps` and `info` to the vtpmctl app."""
    decl.register(app, COMMANDS)
