"""How commands print: one JSON object for scripts, aligned rows for people.

Imports of json and rich stay inside the functions: `caps`, `info` and
`status` are on the start-up path.
"""

import sys
from typing import Any

FORMAT_VERSION = 1


def print_json(data: dict[str, Any]) -> None:
    """One object on stdout; ``format_version`` first unless the caller set it."""
    import json

    sys.stdout.write(json.dumps({"format_version": FORMAT_VERSION, **data}) + "\n")


def print_rows(title: str, rows: list[tuple[str, str]]) -> None:
    """Two aligned columns; a rich table when a person is looking."""
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, show_header=False, box=None, title_justify="left")
        table.add_column(style="bold")
        table.add_column()
        for key, value in rows:
            table.add_row(key, value)
        Console().print(table)
        return
    width = max(len(k) for k, _ in rows)
    sys.stdout.write("".join(f"{k:<{width}}  {v}\n" for k, v in rows))
