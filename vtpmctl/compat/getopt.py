"""GNU ``getopt_long``/``getopt_long_only`` as swtpm's programs parse their arguments.

Scripts and management stacks call swtpm's programs with every spelling glibc
accepts: a unique prefix (``--tpm`` for ``--tpm-device``), ``--opt=value``,
one dash for a long option (``-stop``) and options after operands. The
compatible programs must accept exactly those and refuse the rest with the
same messages, so this parser follows glibc's rules and message formats
rather than argparse's. Parsing goes on after an error (as getopt does); the
caller decides what a bad option means.
"""

from __future__ import annotations

from dataclasses import dataclass, field

NO_ARG, REQUIRED, OPTIONAL = 0, 1, 2


@dataclass(frozen=True)
class Opt:
    """One long option: its name and whether it takes an argument."""

    name: str
    arg: int = NO_ARG


@dataclass
class Parsed:
    """Options in command-line order, operands, and getopt's own complaints."""

    options: list[tuple[str, str | None, str, str]] = field(default_factory=list)
    """(option name, its argument, the argv element that held the value or the option,
    the option as typed)"""
    operands: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    error_at: list[int] = field(default_factory=list)
    """for each error, how many options came before it: a program that acts on options
    in order (``--help`` first wins, as in a getopt loop) needs to know"""

    def error(self, message: str) -> None:
        self.errors.append(message)
        self.error_at.append(len(self.options))

    def before_error(self) -> list[tuple[str, str | None, str, str]]:
        """The options a getopt loop sees before it stops at the first error."""
        return self.options[: self.error_at[0]] if self.errors else self.options


class GetoptLong:
    """Long options only (no short-option string), with or without ``long_only``.

    ``take_extra`` names options that consume one more argv element after
    their argument (swtpm_ioctl's ``--save TYPE FILE``); an element that
    starts with ``-`` is not taken.
    """

    def __init__(self, prog: str, options: list[Opt], *, long_only: bool) -> None:
        self.prog = prog
        self.options = {o.name: o for o in options}
        self.long_only = long_only

    def _match(self, name: str, prefix: str, parsed: Parsed) -> Opt | None:
        if name in self.options:
            return self.options[name]
        found = [o for o in self.options.values() if o.name.startswith(name)]
        if len(found) == 1:
            return found[0]
        if not found:
            return None
        choices = "".join(f" '{prefix}{o.name}'" for o in found)
        parsed.error(f"{self.prog}: option '{prefix}{name}' is ambiguous; possibilities:{choices}")
        return Opt("", -1)  # ambiguity already reported

    def parse(self, argv: list[str], take_extra: frozenset[str] = frozenset()) -> Parsed:
        parsed = Parsed()
        i = 0
        while i < len(argv):
            arg = argv[i]
            i += 1
            if arg == "--":
                parsed.operands.extend(argv[i:])
                break
            if arg.startswith("--"):
                prefix, body = "--", arg[2:]
            elif arg.startswith("-") and arg != "-" and self.long_only:
                prefix, body = "-", arg[1:]
            else:
                parsed.operands.append(arg)
                continue
            name, eq, inline = body.partition("=")
            opt = self._match(name, prefix, parsed)
            if opt is None:
                parsed.error(f"{self.prog}: unrecognized option '{prefix}{body}'")
                continue
            if opt.arg < 0:
                continue
            value: str | None = None
            source = arg
            if eq:
                if opt.arg == NO_ARG:
                    parsed.error(
                        f"{self.prog}: option '{prefix}{opt.name}' doesn't allow an argument"
                    )
                    continue
                value = inline
            elif opt.arg == REQUIRED:
                if i >= len(argv):
                    parsed.error(f"{self.prog}: option '{prefix}{opt.name}' requires an argument")
                    continue
                value = source = argv[i]
                i += 1
            parsed.options.append((opt.name, value, source, arg))
            if opt.name in take_extra:
                if i < len(argv) and not argv[i].startswith("-"):
                    parsed.options.append((opt.name + "\0extra", argv[i], argv[i], argv[i]))
                    i += 1
                else:
                    parsed.options.append((opt.name + "\0extra", None, "", ""))
        return parsed
