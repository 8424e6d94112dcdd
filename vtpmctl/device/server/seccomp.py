"""A system-call filter for a serving vTPM (swtpm's ``--seccomp action=none|kill|log``).

A vTPM that serves only reads and writes its sockets, its device and its
state files. Once it serves, the filter denies what it never needs and what
an attacker who took over the process would want next: running programs,
new processes, debugging others, mounting, loading kernel modules, changing
the clock, rebooting. It is a denylist, as swtpm's: everything else stays
allowed, so Python itself keeps working (threads are ``clone`` with
``CLONE_THREAD``; ``clone3``, whose flags a filter cannot read, answers
ENOSYS so the C library falls back to ``clone``).

The filter is classic BPF built from the table below (``DENIED``), installed
with ``prctl(PR_SET_NO_NEW_PRIVS)`` and ``seccomp(SECCOMP_SET_MODE_FILTER)``
through ctypes, on every thread of the process. It knows x86-64 only;
``available()`` says whether this machine can have it. A system call of
another ABI (i386, x32) gets the action too.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from enum import StrEnum


class SeccompAction(StrEnum):
    """What happens to a denied system call; swtpm's words (its default: kill)."""

    NONE = "none"  # no filter
    KILL = "kill"  # the whole process dies (SIGSYS)
    LOG = "log"  # allowed, and the kernel logs it (audit)


DEFAULT_ACTION = SeccompAction.KILL

# x86-64 system call numbers (asm/unistd_64.h) a serving vTPM never makes.
DENIED: dict[str, int] = {
    # running programs, new processes (clone: only threads, below)
    "fork": 57, "vfork": 58, "execve": 59, "execveat": 322,
    # other processes' memory
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312,
    # file systems and namespaces
    "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "unshare": 272,
    "setns": 308, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
    "fsmount": 432, "fspick": 433, "mount_setattr": 442, "quotactl": 179,
    "quotactl_fd": 443, "swapon": 167, "swapoff": 168, "mknod": 133, "mknodat": 259,
    "open_by_handle_at": 304, "acct": 163, "nfsservctl": 180, "uselib": 134,
    # the kernel and the machine
    "reboot": 169, "kexec_load": 246, "kexec_file_load": 320, "create_module": 174,
    "init_module": 175, "finit_module": 313, "delete_module": 176, "get_kernel_syms": 177,
    "query_module": 178, "_sysctl": 156, "syslog": 103, "iopl": 172, "ioperm": 173,
    "bpf": 321, "perf_event_open": 298, "userfaultfd": 323, "lookup_dcookie": 212,
    "personality": 135, "vhangup": 153, "sethostname": 170, "setdomainname": 171,
    "add_key": 248, "request_key": 249, "keyctl": 250,
    # the clock
    "settimeofday": 164, "clock_settime": 227, "clock_adjtime": 305, "adjtimex": 159,
}  # fmt: skip
CLONE, CLONE3 = 56, 435
CLONE_THREAD = 0x00010000
X32_SYSCALL_BIT = 0x40000000
AUDIT_ARCH_X86_64 = 0xC000003E

# seccomp and classic BPF constants (linux/seccomp.h, linux/filter.h)
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_LOG = 0x7FFC0000
RET_ALLOW = 0x7FFF0000
_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ, _JGE, _JSET = 0x15, 0x35, 0x45  # BPF_JMP | BPF_{JEQ,JGE,JSET} | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K
# struct seccomp_data: nr, arch, instruction pointer, args[6] (64 bit each; low half first)
_NR, _ARCH, _ARG0_LOW = 0, 4, 16
_PR_SET_NO_NEW_PRIVS = 38
_SYS_SECCOMP = 317
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_TSYNC = 1


def available() -> bool:
    """Whether this machine gets a filter (Linux on x86-64)."""
    return platform.system() == "Linux" and platform.machine() == "x86_64"


Insn = tuple[int, int, int, int]  # code, jump if true, jump if false, k


def program(action: SeccompAction) -> list[Insn]:
    """The filter's instructions for a denied call's ``action`` (kill or log)."""
    deny = {SeccompAction.KILL: RET_KILL_PROCESS, SeccompAction.LOG: RET_LOG}[action]
    insns: list[Insn] = [
        (_LD_W_ABS, 0, 0, _ARCH),
        (_JEQ, 1, 0, AUDIT_ARCH_X86_64),
        (_RET_K, 0, 0, deny),  # another ABI (i386)
        (_LD_W_ABS, 0, 0, _NR),
        (_JGE, 0, 1, X32_SYSCALL_BIT),
        (_RET_K, 0, 0, deny),  # the x32 ABI
        (_JEQ, 0, 1, CLONE3),
        (_RET_K, 0, 0, RET_ERRNO | errno.ENOSYS),  # flags unreadable: fall back to clone
    ]
    for number in sorted(set(DENIED.values())):
        insns += [(_JEQ, 0, 1, number), (_RET_K, 0, 0, deny)]
    insns += [
        (_JEQ, 1, 0, CLONE),
        (_RET_K, 0, 0, RET_ALLOW),
        (_LD_W_ABS, 0, 0, _ARG0_LOW),  # clone's flags
        (_JSET, 0, 1, CLONE_THREAD),
        (_RET_K, 0, 0, RET_ALLOW),  # a thread
        (_RET_K, 0, 0, deny),  # a process
    ]
    return insns


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install(action: SeccompAction) -> None:
    """Filter every thread of this process from now on; ``none`` installs nothing.

    The filter stays for the life of the process and its children. OSError when
    the machine or the kernel cannot have it.
    """
    if action is SeccompAction.NONE:
        return
    if not available():
        machine = platform.machine()
        raise OSError(errno.ENOSYS, f"no system-call filter for {machine}; use action=none")
    insns = program(action)
    code = b"".join(struct.pack("=HBBI", *insn) for insn in insns)
    buffer = ctypes.create_string_buffer(code, len(code))
    prog = _SockFprog(len(insns), ctypes.cast(buffer, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")
    libc.syscall.restype = ctypes.c_long
    result = libc.syscall(
        ctypes.c_long(_SYS_SECCOMP),
        ctypes.c_long(_SECCOMP_SET_MODE_FILTER),
        ctypes.c_long(_SECCOMP_FILTER_FLAG_TSYNC),
        ctypes.byref(prog),
    )
    if result != 0:
        err = ctypes.get_errno() if result < 0 else errno.EBUSY  # > 0: a thread could not sync
        raise OSError(err, f"seccomp(SECCOMP_SET_MODE_FILTER): {os.strerror(err)}")
