"""The processes vtpmctl starts: their stable command lines and environment.

Every child runs as ``python -m vtpmctl NAME`` (``vtpmctl/__main__.py``
maps NAME to its module), never under a module path, so that moving a module
never changes a process's command line. This module imports nothing from
vtpmctl: every layer may start a child.
"""

import os
import sys

# entry point name -> the module whose ``main(argv)`` runs it
ENTRY_POINTS = {
    "_daemon": "vtpmctl.device.server.daemon",
    "_manufacture": "vtpmctl.engine.manufacture",
    "_inspect": "vtpmctl.engine.inspect",
}


def entry_argv(name: str) -> list[str]:
    """The command line that runs entry point ``name`` with this interpreter."""
    if name not in ENTRY_POINTS:
        raise ValueError(f"unknown entry point {name!r}")
    return [sys.executable, "-m", "vtpmctl", name]


def child_env() -> dict[str, str]:
    """This environment, minus systemd's notify socket, importing this same vtpmctl."""
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)  # a child must not talk to our service manager
    package_root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return env
