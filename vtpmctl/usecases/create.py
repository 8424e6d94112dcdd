"""``vtpmctl create``: register a name and manufacture its TPM, or leave nothing.

User key files are checked and read before anything is created; the TPM is
made by the short-lived ``python -m vtpmctl _manufacture`` process (this one
never loads libtpms); the registry entry is committed only once the
permanent state is on disk. Any failure removes every file made so far.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vtpmctl import __version__
from vtpmctl.model import KeyFormat, OnShutdown, TpmFamily, Transport
from vtpmctl.store.access import Access
from vtpmctl.store.blob import AesKey
from vtpmctl.store.instance_keys import read_user_key, store_key
from vtpmctl.store.instances import (
    Instance,
    InstanceConfig,
    InstanceMeta,
    Registry,
    write_json,
)
from vtpmctl.store.keys import (
    KeyFileError,
    KeySource,
    check_secret_file_mode,
    generate_key,
    key_fingerprint,
)
from vtpmctl.usecases.supervisor import LifecycleError

MANUFACTURE_TIMEOUT = 120.0


@dataclass
class CreateOptions:
    tpm: TpmFamily = TpmFamily.TPM2
    transport: Transport = Transport.SOCKET
    ek: bool | None = None  # None: yes for TPM 2.0, no for 1.2
    encrypt: bool = False
    key_file: Path | None = None
    key_format: KeyFormat = KeyFormat.AUTO
    migration_key_file: Path | None = None
    migration_key_format: KeyFormat = KeyFormat.AUTO
    ecc_curve: str = "p384"
    key_source: KeySource | None = None  # --key (swtpm's syntax), instead of key_file
    migration_key_source: KeySource | None = None
    group: str | None = None
    socket_mode: str | None = None
    dir_mode: str | None = None
    on_shutdown: OnShutdown | None = None  # None: power-off with a group, else exit


def _user_key(path: Path, kind: str, what: str) -> AesKey:
    try:
        return read_user_key(path, kind)
    except KeyFileError as exc:
        raise LifecycleError(f"{what}: {exc}") from None


def _given_key(source: KeySource, what: str) -> AesKey:
    """A --key value: a file named there must be private, as for --key-file."""
    try:
        if source.path is not None:
            check_secret_file_mode(source.path)
        return source.resolve()
    except KeyFileError as exc:
        raise LifecycleError(f"{what}: {exc}") from None


def create_instance(registry: Registry, name: str, opts: CreateOptions) -> Instance:
    tpm = TpmFamily(opts.tpm)
    ek = tpm.tpm2 if opts.ek is None else opts.ek
    if ek and not tpm.tpm2:
        raise LifecycleError(
            "EK provisioning is implemented for TPM 2.0 only; use --no-ek with --tpm 1.2"
        )
    access = Access.of(opts.group, opts.socket_mode, opts.dir_mode)
    encrypt = opts.encrypt or opts.key_file is not None or opts.key_source is not None
    key: AesKey | None = None
    key_source: str | None = None
    # A key that comes on a descriptor stays with the caller (as libvirt keeps its
    # secrets): no copy is stored, and start takes it the same way.
    keep_key = keep_mkey = True
    if opts.key_source is not None:
        key = _given_key(opts.key_source, "state key")
        keep_key = opts.key_source.fd is None
        key_source = (
            "descriptor"
            if not keep_key
            else "passphrase"
            if opts.key_source.kind == KeyFormat.PASSPHRASE
            else "key-file"
        )
    elif opts.key_file is not None:
        key = _user_key(opts.key_file, opts.key_format, "state key")
        key_source = "passphrase" if opts.key_format == KeyFormat.PASSPHRASE else "key-file"
    elif encrypt:
        key, key_source = generate_key(256), "generated"
    mkey = None
    if opts.migration_key_source is not None:
        mkey = _given_key(opts.migration_key_source, "migration key")
        keep_mkey = opts.migration_key_source.fd is None
    elif opts.migration_key_file is not None:
        mkey = _user_key(opts.migration_key_file, opts.migration_key_format, "migration key")

    config = InstanceConfig(
        name=name,
        tpm=tpm.version,
        transport=Transport(opts.transport),
        encrypted=encrypt,
        migration_key=mkey is not None,
        ek=ek,
        on_shutdown=default_on_shutdown(access) if opts.on_shutdown is None else opts.on_shutdown,
    )
    config.set_access(access)
    registry.paths(name).check_transport(config.transport)
    with registry.reserve(name) as paths:
        registry.ensure_dirs(paths)
        if key is not None and keep_key:
            store_key(paths.state_key, key)
        if mkey is not None and keep_mkey:
            store_key(paths.migration_key, mkey)
        made = _manufacture(
            paths.state_dir,
            paths.log_file,
            tpm2=tpm.tpm2,
            key=key,
            ca_dir=paths.ca_dir if ek else None,
            ecc_curve=opts.ecc_curve,
        )
        ek_info = made.get("ek")
        meta = InstanceMeta(
            vtpmctl_version=__version__,
            libtpms_version=made.get("libtpms_version"),
            cipher=key.cipher if key else None,
            key_source=key_source,
            key_fingerprint=key_fingerprint(key) if key else None,
            migration_key_fingerprint=key_fingerprint(mkey) if mkey else None,
            ek_fingerprints={
                e["algorithm"]: e["fingerprint_sha256"] for e in (ek_info or {}).get("eks", [])
            },
        )
        if ek_info is not None:
            write_json(paths.ek_file, ek_info)
        registry.commit(paths, config, meta)
    return registry.get(name)


def default_on_shutdown(access: Access) -> OnShutdown:
    """An endpoint shared with a group is made for a hypervisor: it outlives VM runs."""
    return OnShutdown.POWER_OFF if access.group is not None else OnShutdown.EXIT


def _manufacture(
    state_dir: Path,
    log_file: Path,
    *,
    tpm2: bool,
    key: AesKey | None,
    ca_dir: Path | None,
    ecc_curve: str,
) -> dict[str, Any]:
    from vtpmctl.childproc import ChildError, run_child
    from vtpmctl.store.keys import key_pipe

    key_fd = None if key is None else key_pipe(key)  # the child reads it; no file holds it
    request = {
        "state_dir": str(state_dir),
        "tpm2": tpm2,
        "log_file": str(log_file),
        "key_fd": key_fd,
        "ek": ca_dir is not None,
        "ca_dir": None if ca_dir is None else str(ca_dir),
        "ecc_curve": ecc_curve,
    }
    fds = () if key_fd is None else (key_fd,)
    try:
        return run_child(
            "_manufacture", request, timeout=MANUFACTURE_TIMEOUT, cwd=None, pass_fds=fds
        ).answer
    except ChildError as exc:
        if exc.kind == "TimeoutExpired":
            raise LifecycleError(
                f"making the TPM took over {MANUFACTURE_TIMEOUT:.0f}s; see {log_file}"
            ) from None
        if not exc.kind:
            raise LifecycleError(f"the TPM maker gave {exc}; see {log_file}") from None
        reason = str(exc) if exc.branch else f"{exc.kind}: {exc}"
        raise LifecycleError(f"cannot make the TPM: {reason}") from None
    finally:
        for fd in fds:
            os.close(fd)
