"""Exit codes of vtpmctl's swtpm, swtpm_setup and swtpm_ioctl against the real 0.7.1 programs.

Scripts and management stacks judge these programs by their exit code and by the first line
of ``--version`` (``… version 0.7.1…``). Each argument vector below runs through both, none
of them starts a TPM; the texts themselves are each program's own.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from compat_bin import install

REAL = {
    name: shutil.which(name, path="/usr/bin") for name in ("swtpm", "swtpm_setup", "swtpm_ioctl")
}
pytestmark = pytest.mark.skipif(None in REAL.values(), reason="needs swtpm 0.7.1's programs")

# (program, arguments). Not here: `swtpm cuse` (Debian's swtpm is built without it, vtpmctl's
# has it) and `swtpm socket` with no channel (0.7.1 then runs serving nothing; vtpmctl asks
# for a port).
VECTORS: list[tuple[str, list[str]]] = [
    ("swtpm", []),
    ("swtpm", ["--version"]),
    ("swtpm", ["-v"]),
    ("swtpm", ["--help"]),
    ("swtpm", ["-h"]),
    ("swtpm", ["--bogus"]),
    ("swtpm", ["bogus"]),
    ("swtpm", ["--tpm2"]),
    ("swtpm", ["socket", "--help"]),
    ("swtpm", ["socket", "-h"]),
    ("swtpm", ["chardev", "--help"]),
    ("swtpm", ["socket", "--version"]),
    ("swtpm", ["socket", "-v"]),
    ("swtpm", ["chardev", "--version"]),
    ("swtpm", ["socket", "--bogus"]),
    ("swtpm", ["socket", "-x"]),
    ("swtpm", ["socket", "--port"]),
    ("swtpm", ["socket", "-p"]),
    ("swtpm", ["socket", "--tpmstate"]),
    ("swtpm", ["socket", "--tpm2", "--ctrl"]),
    ("swtpm", ["socket", "--help", "--bogus"]),
    ("swtpm", ["socket", "--bogus", "--help"]),
    ("swtpm", ["socket", "--help", "--port"]),
    ("swtpm", ["socket", "--help", "extra"]),
    ("swtpm", ["socket", "--help", "--version"]),
    ("swtpm", ["socket", "--version", "--help"]),
    ("swtpm", ["socket", "--flags", "bogus", "--help"]),
    ("swtpm", ["socket", "--print-capabilities"]),
    ("swtpm", ["socket", "--tpm2", "--print-capabilities"]),
    ("swtpm", ["chardev", "--print-capabilities"]),
    ("swtpm", ["socket", "--print-capabilities", "--flags", "bogus"]),
    ("swtpm", ["socket", "--print-capabilities", "--bogus"]),
    ("swtpm", ["socket", "--tpm2", "--print-capabilities", "extra"]),
    ("swtpm", ["socket", "--print-states"]),
    ("swtpm", ["socket", "--vtpm-proxy"]),
    ("swtpm", ["socket", "-c", "/dev/null"]),
    ("swtpm", ["chardev", "-p", "1"]),
    ("swtpm", ["chardev", "--tpm2", "--tpmstate", "dir=."]),
    ("swtpm", ["socket", "-p", "1", "extra"]),
    ("swtpm_setup", []),
    ("swtpm_setup", ["--version"]),
    ("swtpm_setup", ["-v"]),
    ("swtpm_setup", ["--help"]),
    ("swtpm_setup", ["-h"]),
    ("swtpm_setup", ["--bogus"]),
    ("swtpm_setup", ["bogus"]),
    ("swtpm_setup", ["--tpm2"]),
    ("swtpm_setup", ["--tpmstate"]),
    ("swtpm_setup", ["--logfile"]),
    ("swtpm_setup", ["--help", "--bogus"]),
    ("swtpm_setup", ["--bogus", "--help"]),
    ("swtpm_setup", ["--help", "--tpmstate"]),
    ("swtpm_setup", ["--help", "--version"]),
    ("swtpm_setup", ["--version", "--help"]),
    ("swtpm_setup", ["--version", "--bogus"]),
    ("swtpm_setup", ["--help", "extra"]),
    ("swtpm_setup", ["--print-capabilities"]),
    ("swtpm_setup", ["--print-capabilities", "--bogus"]),
    ("swtpm_setup", ["--tpm2", "--tpmstate", "./nonexistent"]),
    ("swtpm_ioctl", []),
    ("swtpm_ioctl", ["--version"]),
    ("swtpm_ioctl", ["-v"]),
    ("swtpm_ioctl", ["--help"]),
    ("swtpm_ioctl", ["-h"]),
    ("swtpm_ioctl", ["--bogus"]),
    ("swtpm_ioctl", ["-c"]),
    ("swtpm_ioctl", ["--unix"]),
    ("swtpm_ioctl", ["--help", "--bogus"]),
    ("swtpm_ioctl", ["--bogus", "--help"]),
    ("swtpm_ioctl", ["--version", "--help"]),
    ("swtpm_ioctl", ["--unix", "./none", "-c"]),
]
# The first line of these, in both programs, is "<words> version X.Y.Z" with the same X.Y.Z.
VERSION_LINE = re.compile(rb"^[^0-9\n]* version (\d+\.\d+\.\d+)\b")
SHAPED = {
    ("swtpm", "--version"),
    ("swtpm", "-v"),
    ("swtpm_setup", "--version"),
    ("swtpm_setup", "--help"),
    ("swtpm_setup", "-h"),
    ("swtpm_ioctl", "--version"),
    ("swtpm_ioctl", "--help"),
}


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install(tmp_path_factory.mktemp("bin"))


def _run(exe: str | Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(exe), *args], capture_output=True, cwd=cwd, timeout=30, stdin=subprocess.DEVNULL
    )


@pytest.mark.parametrize(("program", "args"), VECTORS, ids=[" ".join([p, *a]) for p, a in VECTORS])
def test_exit_code_as_the_real_program(
    program: str, args: list[str], ours: Path, tmp_path: Path
) -> None:
    real = _run(REAL[program] or program, args, tmp_path)
    mine = _run(ours / program, args, tmp_path)
    assert mine.returncode == real.returncode, (mine.stdout[:300], mine.stderr[:300])
    if (program, " ".join(args)) in SHAPED:
        want, got = VERSION_LINE.match(real.stdout), VERSION_LINE.match(mine.stdout)
        assert want is not None and got is not None, (real.stdout[:100], mine.stdout[:100])
        assert got.group(1) == want.group(1) == b"0.7.1"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither made anything here


def _stop(ctrl: Path) -> None:
    deadline = time.monotonic() + 15
    while not ctrl.exists():
        assert time.monotonic() < deadline, f"{ctrl} never appeared"
        time.sleep(0.02)
    res = subprocess.run(
        ["swtpm_ioctl", "--unix", str(ctrl), "-s"], capture_output=True, timeout=15
    )
    assert res.returncode == 0, res.stderr


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 15
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, f"{pid} still runs"
        time.sleep(0.02)


@pytest.mark.parametrize("daemon", [False, True], ids=["foreground", "daemon"])
def test_a_serving_swtpm_prints_what_the_real_one_prints(ours: Path, daemon: bool) -> None:
    """Nothing on stdout or stderr, in the foreground and with --daemon, when all goes well."""
    outputs = []
    for exe in (REAL["swtpm"] or "swtpm", ours / "swtpm"):
        with tempfile.TemporaryDirectory(prefix="swp-", dir="/tmp") as tmp:
            run = Path(tmp)
            ctrl = run / "ctrl"
            argv = [
                str(exe), "socket", "--tpm2", "--tpmstate", f"dir={run}",
                "--flags", "startup-clear", "--ctrl", f"type=unixio,path={ctrl}",
                "--server", f"type=unixio,path={run / 'data'}",
            ]  # fmt: skip
            if daemon:
                argv += ["--daemon", "--pid", f"file={run / 'pid'}"]
                res = subprocess.run(argv, capture_output=True, timeout=30)
                pid = int((run / "pid").read_text())
                _stop(ctrl)
                _wait_gone(pid)
                outputs.append((res.returncode, res.stdout, res.stderr))
                continue
            with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
                try:
                    _stop(ctrl)
                    out, err = proc.communicate(timeout=15)
                finally:
                    proc.kill()
            outputs.append((proc.returncode, out, err))
    assert outputs[0] == outputs[1] == (0, b"", b"")
