"""The system-call filter of ``swtpm --seccomp``: what it denies, and that Python lives under it.

Each check runs a short Python child that installs the filter with the same function the
daemon uses, then does one thing: the daemon itself is tested in tests/interop.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vtpmctl.device.server import seccomp

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not seccomp.available(), reason="the filter is for x86-64 Linux")


def _child(action: str, body: str) -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent(
        f"""
        import os, subprocess, threading
        from vtpmctl.device.server.seccomp import SeccompAction, install
        install(SeccompAction({action!r}))
        print("filtered", flush=True)
        """
    ) + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


def test_the_program_checks_the_architecture_first() -> None:
    insns = seccomp.program(seccomp.SeccompAction.KILL)
    assert insns[0][3] == 4 and insns[1][3] == seccomp.AUDIT_ARCH_X86_64  # seccomp_data.arch
    assert insns[2] == (0x06, 0, 0, seccomp.RET_KILL_PROCESS)
    assert insns[-1] == (0x06, 0, 0, seccomp.RET_KILL_PROCESS)  # clone without CLONE_THREAD
    log = seccomp.program(seccomp.SeccompAction.LOG)
    assert seccomp.RET_KILL_PROCESS not in {k for code, _, _, k in log if code == 0x06}
    assert len(insns) < 4096  # the kernel's limit (BPF_MAXINSNS)


def test_none_installs_nothing() -> None:
    res = _child("none", "print(open('/proc/self/status').read())")
    assert "Seccomp:\t0" in res.stdout, res.stderr


def test_kill_keeps_python_and_threads_alive_and_kills_on_exec() -> None:
    res = _child(
        "kill",
        """
        t = threading.Thread(target=lambda: print("thread", flush=True))
        t.start(); t.join()
        print(open("/proc/self/status").read(), flush=True)
        os.execv("/bin/true", ["true"])
        print("not reached")
        """,
    )
    assert res.returncode == -signal.SIGSYS, (res.returncode, res.stderr)
    assert "filtered\nthread\n" in res.stdout
    assert "Seccomp:\t2" in res.stdout
    assert "not reached" not in res.stdout


@pytest.mark.parametrize(
    "call",
    [
        "os.fork()",
        "subprocess.run(['/bin/true'])",
        "os.chroot('/')",
        "import ctypes; ctypes.CDLL(None).mount(b'none', b'/mnt', b'tmpfs', 0, None)",
        "import ctypes; ctypes.CDLL(None).ptrace(16, 1, 0, 0)",  # PTRACE_ATTACH
    ],
)
def test_kill_kills_on_each_denied_call(call: str) -> None:
    res = _child("kill", f"{call}\nprint('not reached')")
    assert res.returncode == -signal.SIGSYS, (call, res.returncode, res.stderr)
    assert res.stdout == "filtered\n"


def test_log_allows_what_kill_denies() -> None:
    res = _child(
        "log",
        """
        print(subprocess.run(["/bin/true"]).returncode)
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        """,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == "filtered\n0\n7\n"
