"""How commands print: one JSON object for scripts, aligned rows for people.

Imports of json and rich stay inside the functions: `caps`, `info` and
`status` are on the start-up path.
"""

import sys

# `typing` costs more to import than a control round trip; annotations only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

FORMAT_VERSION = 1


def safe(text: str) -> str:
    """``text`` with every character a terminal could act on written as an escape.

    Text from files (a bundle's manifest, ek.json, config, logs, a peer's info)
    is printed through this: control characters (ESC, BEL, CR, newlines, C1),
    bidi overrides and other unprintables become ``\\xNN``/``\\uNNNN``, so a
    crafted host name cannot retitle, clear or rewrite the terminal.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def out(text: str) -> None:
    """One line of human output on stdout."""
    sys.stdout.write(safe(text) + "\n")


def note(text: str) -> None:
    """One diagnostic line on stderr."""
    sys.stderr.write(f"vtpmctl: {safe(text)}\n")


def print_json(data: "dict[str, Any]") -> None:
    """One object on stdout; ``format_version`` first unless the caller set it."""
    import json

    sys.stdout.write(json.dumps({"format_version": FORMAT_VERSION, **data}) + "\n")


def print_rows(title: str, rows: list[tuple[str, str]]) -> None:
    """Two aligned columns; a rich table when a person is looking."""
    title = safe(title)
    rows = [(safe(k), safe(v)) for k, v in rows]
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=escape(title), show_header=False, box=None, title_justify="left")
        table.add_column(style="bold")
        table.add_column()
        for key, value in rows:
            table.add_row(escape(key), escape(value))
        Console().print(table)
        return
    width = max(len(k) for k, _ in rows)
    sys.stdout.write("".join(f"{k:<{width}}  {v}\n" for k, v in rows))


def print_table(
    headers: list[str], rows: list[list[str]], styles: "dict[str, str] | None" = None
) -> None:
    """Columns under headers; a rich table when a person is looking.

    ``styles`` colours a second-column value (a state) on a terminal.
    """
    rows = [[safe(c) for c in row] for row in rows]
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        table = Table(box=None, header_style="bold")
        for h in headers:
            table.add_column(h)
        for row in rows:
            cells = [escape(c) for c in row]
            style = styles.get(row[1]) if styles else None
            if style:
                cells[1] = f"[{style}]{cells[1]}[/]"
            table.add_row(*cells)
        Console().print(table)
        return
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        sys.stdout.write("\n")
