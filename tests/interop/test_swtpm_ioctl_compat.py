"""vtpmctl's ``swtpm_ioctl`` against the real one: same exit status, stdout, stderr and files.

Each scenario of test_swtpm_ioctl_parity runs twice, the real swtpm_ioctl against one real
``swtpm socket`` and ours against a second one started alike, so any difference is the
client's. Command lines that never reach a TPM (getopt's spellings, bad localities, ports,
devices) are compared one by one. Only ``--help`` and ``--version`` are our own text.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from compat_bin import install
from swtpm_peer import SWTPM_IOCTL
from test_swtpm_ioctl_parity import SEQUENCES, blobs, side_by_side  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(install(tmp_path_factory.mktemp("bin")) / "swtpm_ioctl")


def run(exe: str, args: list[str], cwd: Path, stdin: bytes = b"") -> tuple[int, bytes, bytes]:
    res = subprocess.run([exe, *args], capture_output=True, cwd=cwd, timeout=30, input=stdin)
    # getopt's messages start with argv[0]: the path each was called by
    err = res.stderr.replace(exe.encode() + b":", b"swtpm_ioctl:")
    out = res.stdout
    if out.startswith((b"TPM emulator control tool", b"swtpm_ioctl-compatible TPM control tool")):
        out = b"<usage or version: each its own text>"
    return res.returncode, out, err


OFFLINE = [
    [],
    ["-c"],
    ["--tpm-device"],
    ["-c", "--unix"],
    ["-c", "/nonexistent/dev"],
    ["--tpm-device", "/nonexistent/dev", "-c"],
    ["-c", "-i", "/dev/x"],
    ["-r"],
    ["-r", "5", "/dev/x"],
    ["-r", "x", "/dev/x"],
    ["-l", "-1", "/dev/x"],
    ["-l", "=3", "/dev/x"],
    ["-l=3", "/dev/x"],
    ["-l", "4294967300", "/dev/x"],
    ["-b", "abc", "/dev/x"],
    ["--info", "1x", "/dev/x"],
    ["--info=1", "/dev/x"],
    ["--save", "/dev/x"],
    ["--save", "permanent"],
    ["--save", "permanent", "-c", "/dev/x"],
    ["--load", "permanent"],
    ["--lock-storage", "3", "/dev/x"],
    ["--tcp", ":abc"],
    ["--tcp", ":99999", "-c"],
    ["--tcp", "127.0.0.1:99999", "-c"],
    ["--tcp", "abc:1:2", "-c"],
    ["--tcp", "[::1]:1", "-c"],
    ["--tcp", ":1", "-c"],
    ["--unix", "/nonexistent", "-c"],
    ["--unix", "/" + "x" * 120, "-c"],
    ["-c", "/dev/null"],
    ["--t", "/dev/x"],
    ["-t", "/dev/x"],
    ["-ci", "/dev/x"],
    ["-c=1", "/dev/x"],
    ["-c", "-x", "/dev/x"],
    ["--", "-c", "/dev/x"],
    ["--sav", "permanent", "f"],
    ["-stop", "/dev/null"],
    ["--stop", "/dev/null"],
    ["-c", "/dev/null"],
    ["--sav", "permanent", "f", "/dev/null"],
    ["--save", "permanent", "/nonexistent/f", "/dev/null"],
    ["--save", "bogus", "f", "/dev/null"],
    ["--load", "permanent", "/nonexistent/f", "/dev/null"],
    ["-h", "x", "/dev/null"],
    ["--info", "1", "/dev/null"],
    ["-r", "1", "/dev/null"],
    ["-e", "/dev/null"],
    ["--tpm-device", "/dev/null", "--unix", "/nonexistent", "-g"],
    ["--unix", "/nonexistent", "--tcp", ":1", "-e"],
    ["-l", "0", "--unix", "/nonexistent", "-c"],
]


@pytest.mark.parametrize("args", OFFLINE, ids=lambda a: " ".join(a) or "none")
def test_command_line_parity(args: list[str], ours: str, tmp_path: Path) -> None:
    assert run(ours, args, tmp_path) == run(SWTPM_IOCTL, args, tmp_path)


def sequence(
    exe: str, server: Any, steps: list[list[str]], files: dict[str, Path], workdir: Path
) -> list[tuple[Any, ...]]:
    workdir.mkdir()
    outcome: list[tuple[Any, ...]] = []
    for step in steps:
        args = [a.format(**{k: str(v) for k, v in files.items()}) for a in step]
        out_file = workdir / "out.bin"
        out_file.unlink(missing_ok=True)
        row: tuple[Any, ...] = (step, *run(exe, [*server.ioctl_target, *args], workdir))
        if step[0] == "--save":
            blob = out_file.read_bytes() if out_file.exists() else None
            row += (None,) if blob is None else (len(blob), blob[:10])
        outcome.append(row)
    outcome.append(("exit status", server.proc.wait(5) if steps[-1] == ["-s"] else None))
    return outcome


@pytest.mark.parametrize(("name", "steps"), SEQUENCES, ids=[n for n, _ in SEQUENCES])
def test_sequence_parity(
    name: str,
    steps: list[list[str]],
    ours: str,
    blobs: dict[bool, dict[str, Path]],  # noqa: F811
    tmp_path: Path,
    swtpm_server: Callable[..., Any],
    manufactured: Callable[[bool, Path], Path],
) -> None:
    mine = swtpm_server(manufactured(True, tmp_path / "a"), tpm2=True)
    theirs = swtpm_server(manufactured(True, tmp_path / "b"), tpm2=True)
    got, want = side_by_side(
        lambda: sequence(ours, mine, steps, blobs[True], tmp_path / "ours"),
        lambda: sequence(SWTPM_IOCTL, theirs, steps, blobs[True], tmp_path / "real"),
    )
    assert got == want


def test_hash_from_stdin_and_tcp(
    ours: str, tmp_path: Path, swtpm_server: Callable[..., Any]
) -> None:
    mine = swtpm_server(ctrl="tcp", data="tcp")
    theirs = swtpm_server(ctrl="tcp", data="tcp")
    data = b"x" * 10000
    for exe, server in ((ours, mine), (SWTPM_IOCTL, theirs)):
        assert run(exe, [*server.ioctl_target, "-i"], tmp_path) == (0, b"", b"")
        server.tpm2("startup", "-c")
        assert run(exe, [*server.ioctl_target, "-h", "-"], tmp_path, data) == (0, b"", b"")
    pcr17 = [s.tpm2("pcrread", "sha256:17").stdout for s in (mine, theirs)]
    assert pcr17[0] == pcr17[1]
