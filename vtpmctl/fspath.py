"""File names as ``str``, spelled as ``pathlib.Path`` spells them.

The daemon's modules take paths as ``str`` or any ``os.PathLike`` and work
on ``str``: ``pathlib`` brings ``fnmatch``, ``urllib.parse`` and
``ipaddress`` into the zygote and so into each daemon (0.6 MiB a daemon;
docs/architecture.md, "The zygote"). ``clean`` gives the spelling a ``Path``
would print, so a message names a file as it did when these were ``Path``s.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TypeAlias

    StrPath: TypeAlias = "str | os.PathLike[str]"


def clean(path: StrPath) -> str:
    """``str(Path(path))``: repeated slashes, ``.`` parts and a trailing slash dropped."""
    text = os.fspath(path)
    if text.startswith("//") and not text.startswith("///"):
        root = "//"  # POSIX leaves the meaning of exactly two leading slashes open
    elif text.startswith("/"):
        root = "/"
    else:
        root = ""
    parts = [part for part in text.split("/") if part and part != "."]
    return root + "/".join(parts) if root or parts else "."


def parent(path: StrPath) -> str:
    """``str(Path(path).parent)``."""
    text = clean(path)
    head, sep, _ = text.rpartition("/")
    if not sep:
        return "."
    if head.strip("/"):
        return head
    return text[: len(head) + 1]  # the root itself: "/", or "//"


def name(path: StrPath) -> str:
    """``Path(path).name``."""
    text = clean(path)
    return "" if text == "." or not text.strip("/") else text.rpartition("/")[2]


def join(path: StrPath, *names: str) -> str:
    """``str(Path(path, *names))``."""
    return clean(os.path.join(os.fspath(path), *names))
