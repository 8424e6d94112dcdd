"""Where vtpmctl keeps things: the four store roots.

root uses the FHS dirs, other users their XDG dirs (platformdirs; the runtime
dir is judged here, see _user_runtime_root), so an
unprivileged user can run vTPMs without touching the system store. systemd's
``$STATE_DIRECTORY`` & co. win over the defaults so a unit's sandboxed dirs are
used, and ``$VTPMCTL_HOME`` wins over everything (one tree, for tests and
for side-by-side stores).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

APP = "vtpmctl"

# systemd's variables may hold several colon-separated dirs; the first is ours.
_SYSTEMD = {
    "config": "CONFIGURATION_DIRECTORY",
    "state": "STATE_DIRECTORY",
    "runtime": "RUNTIME_DIRECTORY",
    "logs": "LOGS_DIRECTORY",
}


@dataclass(frozen=True)
class Roots:
    """The config (secrets, CA), state (registry), runtime (sockets) and log roots."""

    config: Path
    state: Path
    runtime: Path
    logs: Path
    origin: str  # "home" | "system" | "user"


def _systemd_dir(env: Mapping[str, str], var: str) -> Path | None:
    value = env.get(var, "")
    first = value.split(":", 1)[0]
    return Path(first) if first and os.path.isabs(first) else None


def _private_dir_of(path: str, euid: int) -> bool:
    """A real dir (no link) of this user that no one else may enter, as XDG requires."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == euid and not st.st_mode & 0o077


def _user_runtime_root(env: Mapping[str, str], euid: int, dirs: dict[str, Path]) -> Path:
    """$XDG_RUNTIME_DIR, else /run/user/UID, when private to this user; else the state root's run/.

    Judged here rather than by platformdirs, whose versions differ (some warn on
    stderr, in two lines, on every command, or fall back to a shared /tmp path).
    """
    for candidate in (env.get("XDG_RUNTIME_DIR", ""), f"/run/user/{euid}"):
        if os.path.isabs(candidate) and _private_dir_of(candidate, euid):
            return Path(candidate) / APP
    return dirs["state"] / "run"


def store_roots(env: Mapping[str, str] | None = None, euid: int | None = None) -> Roots:
    """The roots for this process (``env``/``euid`` let tests ask for another)."""
    env = os.environ if env is None else env
    home = env.get("VTPMCTL_HOME")
    if home:
        base = Path(home).expanduser().absolute()
        return Roots(base / "etc", base / "lib", base / "run", base / "log", "home")
    if (os.geteuid() if euid is None else euid) == 0:
        dirs = {
            "config": Path("/etc") / APP,
            "state": Path("/var/lib") / APP,
            "runtime": Path("/run") / APP,
            "logs": Path("/var/log") / APP,
        }
        origin = "system"
    else:
        import platformdirs

        dirs = {
            "config": Path(platformdirs.user_config_dir(APP)),
            "state": Path(platformdirs.user_state_dir(APP)),
            "logs": Path(platformdirs.user_log_dir(APP)),
        }
        dirs["runtime"] = _user_runtime_root(env, os.geteuid() if euid is None else euid, dirs)
        origin = "user"
    for key, var in _SYSTEMD.items():
        override = _systemd_dir(env, var)
        if override is not None:
            dirs[key] = override
    return Roots(dirs["config"], dirs["state"], dirs["runtime"], dirs["logs"], origin)
