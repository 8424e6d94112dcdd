"""libvirt for the acceptance tests: its own virtlogd + libvirtd, diskless OVMF domains.

Only one libvirtd can run on a machine, and tests of several sessions share it, so
``libvirt_session`` first takes an exclusive ``flock`` on ``/tmp/vtpmctl-libvirt.lock``
and holds it for its whole life. Inside the lock it reuses a running libvirtd (and leaves
it running) or starts ``virtlogd -d`` and ``libvirtd -d`` itself (no systemd needed) and
stops them on exit; either way every domain it defined is destroyed and undefined, with
its managed save and NVRAM, so nothing is left running or defined afterwards.

A domain is q35 under TCG with OVMF (a copy of the VARS template per domain), no disk, no
network, a serial console written to a file, and the ``<tpm>`` element the caller gives.
OVMF measures into PCRs 0-7 in PEI and DXE and, on its first boot attempt, measures the
separators; then it prints ``BdsDxe: starting Boot…`` on the serial console. That line is
how ``wait_firmware`` knows the firmware has sent all its TPM commands (about 5-15 s after
``start`` under TCG; the UEFI shell that follows is never waited for).

Usage::

    with libvirt_session(work_dir) as lv:          # work_dir: a fresh dir (kept short)
        dom = lv.define("demo", tpm_xml)           # domain "vtpmctl-t-demo"
        dom.start()
        dom.wait_firmware()
        dom.save(work_dir / "demo.save"); dom.restore(work_dir / "demo.save")
        dom.managedsave(); dom.start()             # resumes, no new boot
        dom.kill_qemu(); dom.start(); dom.wait_firmware()
        dom.reset(); dom.wait_firmware()           # a machine reset: the firmware runs again
        dom.guest_reboot(); dom.wait_firmware()    # the guest reboots itself (UEFI shell)
        dom.destroy()

``tpm_xml`` is a whole ``<tpm>…</tpm>`` element, e.g. the external backend::

    <tpm model='tpm-crb'><backend type='external'>
      <source type='unix' mode='connect' path='/run/vtpmctl/NAME/tpm.ctrl'/>
    </backend></tpm>

Every ``virsh`` failure raises AssertionError with virsh's stderr and the tail of QEMU's
log (``/var/log/libvirt/qemu/DOMAIN.log``) and of libvirtd's log. ``unavailable()`` says
why libvirt cannot run here (for ``pytest.mark.skipif``), or None.

The work dir must be reachable by the ``libvirt-qemu`` user (QEMU opens the NVRAM and
serial files there after libvirt has chowned them): ``libvirt_session`` makes it 0711.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

LOCK_PATH = Path("/tmp/vtpmctl-libvirt.lock")
URI = "qemu:///system"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
QEMU_EXE = Path("/usr/bin/qemu-system-x86_64")
DOMAIN_PREFIX = "vtpmctl-t-"  # every domain of this harness; leftovers are removed
FIRMWARE_BOOTING = b"BdsDxe: starting"  # OVMF has measured PCRs 0-7, separators included
_RESET_KEYS = ["KEY_R", "KEY_E", "KEY_S", "KEY_E", "KEY_T", "KEY_ENTER"]  # the shell's reset
QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")
QEMU_PID_DIR = Path("/run/libvirt/qemu")
_DAEMONS = (("virtlogd", Path("/run/virtlogd.pid")), ("libvirtd", Path("/run/libvirtd.pid")))


def unavailable() -> str | None:
    """Why these tests cannot run on this machine, or None."""
    if os.geteuid() != 0:
        return "libvirt tests run as root (qemu:///system)"
    for exe in ("virsh", "libvirtd", "virtlogd"):
        if shutil.which(exe) is None:
            return f"{exe} is not installed (scripts/setup --test)"
    for path in (OVMF_CODE, OVMF_VARS, QEMU_EXE):
        if not path.exists():
            return f"{path} is missing (scripts/setup --test)"
    return None


def _tail(path: Path, n: int = 2500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(none)"


def _daemon_pid(exe: str, pid_file: Path) -> int | None:
    """The pid in ``pid_file`` if that process is alive and is ``exe``."""
    try:
        pid = int(pid_file.read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError):
        return None
    return pid if comm == exe else None


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    return False


@dataclass
class Libvirt:
    """A libvirtd this process may use while the session lasts; defines domains."""

    work_dir: Path
    daemon_log: Path
    domains: list[Domain] = field(default_factory=list)

    def virsh(
        self, *args: str, check: bool = True, timeout: float = 90.0
    ) -> subprocess.CompletedProcess[str]:
        """``virsh -c qemu:///system ARGS``; on failure, an AssertionError with the logs."""
        result = subprocess.run(
            ["virsh", "-q", "-c", URI, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"virsh {' '.join(args)} exited {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}\n{self.describe(args)}"
            )
        return result

    def describe(self, args: tuple[str, ...] = ()) -> str:
        """The logs of the domains named in ``args`` (all, if none) and of libvirtd."""
        named = [d for d in self.domains if d.name in args] or self.domains
        parts = [f"--- {d.name} ---\n{d.describe()}" for d in named]
        parts.append(f"--- libvirtd log (tail) ---\n{_tail(self.daemon_log)}")
        return "\n".join(parts)

    def define(self, name: str, tpm_xml: str, *, memory_mib: int = 128) -> Domain:
        """Define domain ``vtpmctl-t-NAME`` with ``tpm_xml`` as its TPM; not started."""
        dom = Domain(self, DOMAIN_PREFIX + name, self.work_dir / name)
        dom.dir.mkdir(mode=0o711)
        os.chmod(dom.dir, 0o711)  # QEMU (libvirt-qemu) opens the NVRAM and serial file here
        shutil.copyfile(OVMF_VARS, dom.nvram)
        xml = dom.dir / "domain.xml"
        xml.write_text(_domain_xml(dom, tpm_xml, memory_mib))
        self.domains.append(dom)
        self.virsh("define", str(xml))
        return dom

    def remove_domain(self, name: str) -> None:
        """Destroy and undefine a domain (with managed save and NVRAM), if it exists."""
        self.virsh("destroy", name, check=False)
        self.virsh("undefine", name, "--managed-save", "--nvram", check=False)


def _domain_xml(dom: Domain, tpm_xml: str, memory_mib: int) -> str:
    return f"""<domain type='qemu'>
  <name>{escape(dom.name)}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>{OVMF_CODE}</loader>
    <nvram>{escape(str(dom.nvram))}</nvram>
    <boot dev='hd'/>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{QEMU_EXE}</emulator>
    <serial type='file'>
      <source path='{escape(str(dom.serial_log))}' append='on'/>
      <target port='0'/>
    </serial>
    {tpm_xml}
    <memballoon model='none'/>
  </devices>
</domain>
"""


@dataclass
class Domain:
    """One defined domain; every call waits until libvirt reports it done."""

    lv: Libvirt
    name: str
    dir: Path
    _boots_before: int = 0
    _serial_mark: int = 0  # where the serial log stood at the last start/reset

    @property
    def nvram(self) -> Path:
        return self.dir / "VARS.fd"

    @property
    def serial_log(self) -> Path:
        return self.dir / "serial.log"

    @property
    def qemu_log(self) -> Path:
        return QEMU_LOG_DIR / f"{self.name}.log"

    def describe(self) -> str:
        serial = _tail(self.serial_log, 600).replace("\x1b", "^[")
        return f"--- QEMU log ---\n{_tail(self.qemu_log)}\n--- serial (tail) ---\n{serial}"

    def virsh(self, command: str, *args: str) -> subprocess.CompletedProcess[str]:
        return self.lv.virsh(command, self.name, *args)

    def state(self) -> str:
        """``virsh domstate``: "running", "shut off", "paused", ..."""
        return self.lv.virsh("domstate", self.name).stdout.strip()

    def qemu_pid(self) -> int | None:
        return _daemon_pid("qemu-system-x86", QEMU_PID_DIR / f"{self.name}.pid")

    def boots(self) -> int:
        """How often the firmware has reached its first boot option (serial log)."""
        try:
            return self.serial_log.read_bytes().count(FIRMWARE_BOOTING)
        except FileNotFoundError:
            return 0

    def _boot_follows(self) -> None:
        self._boots_before = self.boots()
        self._serial_mark = self.serial_log.stat().st_size if self.serial_log.exists() else 0

    def start(self) -> None:
        """``virsh start`` (resumes from a managed save if there is one)."""
        self._boot_follows()
        self.virsh("start")

    def destroy(self) -> None:
        """``virsh destroy``: QEMU gets SIGTERM and exits in order (CMD_SHUTDOWN)."""
        self.virsh("destroy")

    def reset(self) -> None:
        """``virsh reset``: the machine reset a guest reboot does; the firmware runs again."""
        self._boot_follows()
        self.virsh("reset")

    def guest_reboot(self, timeout: float = 60.0) -> None:
        """The guest reboots itself: ``reset`` typed into the UEFI shell (after wait_firmware).

        A key press skips the shell's startup.nsh countdown; then the firmware's
        ResetSystem resets the machine as a guest OS reboot does.
        """
        deadline = time.monotonic() + timeout
        for marker, keys in ((b"Press", ["KEY_SPACE"]), (b"Shell>", _RESET_KEYS)):
            while marker not in self.serial_log.read_bytes()[self._serial_mark :]:
                if time.monotonic() > deadline:
                    raise AssertionError(f"no {marker!r} from the UEFI shell\n{self.describe()}")
                time.sleep(0.1)
            if marker == b"Shell>":
                self._boot_follows()
            self.virsh("send-key", *keys)

    def save(self, path: Path) -> None:
        self.virsh("save", str(path))

    def restore(self, path: Path) -> None:
        self.lv.virsh("restore", str(path))

    def managedsave(self) -> None:
        self.virsh("managedsave")

    def kill_qemu(self, timeout: float = 30.0) -> None:
        """SIGKILL to QEMU; returns once libvirt reports the domain shut off."""
        pid = self.qemu_pid()
        assert pid is not None, f"{self.name} has no QEMU\n{self.describe()}"
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while self.state() != "shut off":
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not shut off {timeout}s after kill -9")
            time.sleep(0.1)

    def wait_firmware(self, timeout: float = 120.0) -> float:
        """Until OVMF has sent its TPM commands since the last start/reset; the seconds."""
        t0 = time.monotonic()
        while self.boots() <= self._boots_before:
            if time.monotonic() - t0 > timeout:
                raise AssertionError(
                    f"OVMF did not reach a boot option in {timeout}s\n{self.lv.describe()}"
                )
            if self.qemu_pid() is None and self.state() != "running":
                raise AssertionError(f"{self.name} stopped during boot\n{self.lv.describe()}")
            time.sleep(0.1)
        return time.monotonic() - t0


def _lock(timeout: float) -> int:
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() > deadline:
            os.close(fd)
            raise AssertionError(f"{LOCK_PATH} still held by another session after {timeout}s")
        time.sleep(0.2)


def _daemon_path(pid: int) -> str:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return ""
    return next((e[5:].decode() for e in environ if e.startswith(b"PATH=")), "")


def _start_daemons(log: Path, path_prefix: Path | None = None) -> list[int]:
    """Start virtlogd and libvirtd unless they run; the pids of the ones started here.

    With ``path_prefix``, libvirtd must look up programs (swtpm, swtpm_setup,
    swtpm_ioctl) there first: a running libvirtd whose PATH does not start with it is
    stopped and one with it is started (and stopped again at the end).
    """
    started = []
    env = dict(os.environ, LIBVIRT_LOG_OUTPUTS=f"3:file:{log}")
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    for exe, pid_file in _DAEMONS:
        pid = _daemon_pid(exe, pid_file)
        wrong_path = not _daemon_path(pid or 0).startswith(f"{path_prefix}:")
        if pid is not None and path_prefix is not None and exe == "libvirtd" and wrong_path:
            _stop([pid])
            pid = None
        if pid is not None:
            continue
        subprocess.run([exe, "-d"], env=env, check=True, timeout=30)
        deadline = time.monotonic() + 10
        while (pid := _daemon_pid(exe, pid_file)) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{exe} -d wrote no pid file\n{_tail(log)}")
            time.sleep(0.02)
        started.append(pid)
    return started


def _wait_connect(timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = subprocess.run(
            ["virsh", "-q", "-c", URI, "version"], capture_output=True, text=True, check=False
        )
        if result.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"libvirtd does not answer: {result.stderr}")
        time.sleep(0.05)


def _stop(pids: list[int]) -> None:
    for pid in reversed(pids):  # libvirtd before virtlogd
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not _wait_gone(pid, 15.0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 5.0)


@contextlib.contextmanager
def libvirt_session(
    work_dir: Path, *, lock_timeout: float = 900.0, path_prefix: Path | None = None
) -> Iterator[Libvirt]:
    """The lock, a libvirtd, and on exit: domains gone, daemons started here stopped.

    ``path_prefix``: a directory libvirtd's PATH starts with (see _start_daemons).
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(work_dir, 0o711)
    lock_fd = _lock(lock_timeout)
    started: list[int] = []
    lv = Libvirt(work_dir, work_dir / "libvirtd.log")
    try:
        started = _start_daemons(lv.daemon_log, path_prefix)
        _wait_connect()
        leftovers = lv.virsh("list", "--all", "--name").stdout.split()
        for name in leftovers:
            if name.startswith(DOMAIN_PREFIX):
                lv.remove_domain(name)
        yield lv
    finally:
        try:
            for dom in lv.domains:
                lv.remove_domain(dom.name)
        finally:
            _stop(started)
            os.close(lock_fd)
