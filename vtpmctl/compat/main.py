"""The multi-call entry point of the swtpm-compatible programs.

The launchers ``vtpmctl swtpm-compat install`` writes are all the same
script; the name it is started as (``argv[0]``'s basename) picks the
program. ``python -m vtpmctl.compat PROGRAM ARGS…`` runs one by its name.
Nothing heavy is imported before the program is known.
"""

from __future__ import annotations

import os
import sys

from vtpmctl.model import SwtpmProgram

# The module that implements each program (its ``main(argv) -> int``).
MODULES = {program: f"vtpmctl.compat.{program.value}" for program in SwtpmProgram}


def program_of(argv0: str) -> SwtpmProgram | None:
    """The program a launcher's path names, or None."""
    name = os.path.basename(argv0)
    try:
        return SwtpmProgram(name)
    except ValueError:
        return None


def run(program: SwtpmProgram, args: list[str], argv0: str) -> int:
    """``main(args, prog)`` of the program's module; ``prog`` is the name as started."""
    import importlib

    try:
        module = importlib.import_module(MODULES[program])
    except ModuleNotFoundError as exc:
        if exc.name != MODULES[program]:
            raise
        sys.stderr.write(f"{program}: not provided by this version of vtpmctl\n")
        return 1
    result: int = module.main(args, argv0)
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the program ``argv[0]`` names; ``argv`` is the whole argument vector."""
    argv = list(sys.argv if argv is None else argv)
    program = program_of(argv[0]) if argv else None
    if program is not None:
        return run(program, argv[1:], argv[0])
    names = ", ".join(p.value for p in SwtpmProgram)
    sys.stderr.write(
        f"vtpmctl: started as {os.path.basename(argv[0]) if argv else '?'!r}; this entry point "
        f"runs as one of {names}: install launchers with `vtpmctl swtpm-compat install DIR`\n"
    )
    return 2
