"""One error tree: every error vtpmctl reports is a ``VtpmctlError``.

The message of an error is one line for the user: what failed and what to
do. ``cli.run`` prints it and exits with the error's ``exit_code``; ``status``
exits with its ``lsb_code``. Nothing else decides exit codes, so a new error
only has to pick its branch. Branches are defined here; a leaf whose message
needs a table of a higher layer (TPM command names, ptm result names) is
defined next to that table and subclasses its branch here.

::

    VtpmctlError                 exit 1
    ├── UsageError               exit 2: options that cannot go together; nothing was done
    │   ├── ServeOptionError     (device.server.daemon) a `serve` option's value cannot be used
    │   ├── SwtpmOptionError     an option value in swtpm's key=value syntax (store.tpmstate)
    │   └── AccessError          (store.access) a --group, --socket-mode or --dir-mode value
    ├── DeviceError              the swtpm-compatible device on the other side of the wire
    │   ├── TargetError          (device.client.control) TARGET cannot be reached, or is no TPM
    │   ├── ControlError         (device.client.control) a control command failed; .result
    │   │                        is the ptm result code
    │   └── SwtpmIoctlError      (compat.swtpm_ioctl) what swtpm_ioctl 0.7.1 would report
    ├── TpmResultError           a TPM answered with a non-zero return code; .rc carries it
    │   ├── TpmError             (engine.tpm2.rc) a TPM 2.0 command's response code
    │   └── LibtpmsError         (engine.libtpms) a libtpms call's TPM_RESULT
    ├── EngineError              the TPM in this process cannot do what was asked
    │   ├── FatalEngineError     (engine.tpm) the storage lock is lost; the process must end
    │   ├── MalformedResponse    (engine.tpm2.rc) response bytes of the wrong shape; also a
    │   │                        ValueError
    │   ├── ManufactureError     (engine.manufacture) the TPM could not be made
    │   └── ProvisionError       (engine.provision) EKs/certificates cannot be provisioned
    ├── SwtpmSetupError          (compat.swtpm_setup) what swtpm_setup 0.7.1 would report
    ├── ChildError               (childproc) a child process failed; takes the exit code of
    │                            the branch its error belongs to
    ├── ServeError               a TPM cannot be served
    │   ├── DaemonError          (device.server.daemon) the daemon cannot start
    │   ├── EndpointError        (device.server.sockets) a --ctrl/--data spec cannot be used
    │   ├── SwtpmError           (compat.swtpm) what swtpm 0.7.1 would report, with its exit code
    │   └── CuseError            (device.server.cuse.wire) the CUSE device cannot be created
    ├── StoreError               bytes at rest cannot be used
    │   ├── LeaseError           (store.lease) a lease object in a remote is malformed
    │   ├── ReplicationFileError (store.replication) a binding, spec or status file of a
    │   │                        bound instance
    │   ├── NoSpaceError         (store.atomic) the disk filled up writing a file; also an
    │   │                        OSError (ENOSPC/EDQUOT), so write failures stay handled
    │   ├── BlobError            (store.blob) a state blob; .rc is the ptm result to answer
    │   ├── StateDirError        (store.statedir) a TPM state directory
    │   ├── KeyFileError         (store.keys) a key or passphrase file
    │   ├── CAError              (store.ca) the EK CA directory
    │   ├── SnapshotError        (store.snapshots) a snapshot or the snapshot store
    │   │   └── RestorePendingError  (store.snapshots) an interrupted restore needs the user
    │   ├── StateFileError       (commands.state) a blob file given to state export/import
    │   ├── UnsafeDirError       (store.dirs) a store dir another user owns or may write
    │   ├── LauncherError        (usecases.swtpm_compat) a swtpm-compat launcher cannot be
    │   │                        installed or removed
    │   └── BundleError          (store.bundle) a migration bundle
    │       └── MigrationKeyError    (store.bundle) its migration key is missing or wrong
    ├── RemoteError              an S3-compatible remote (docs/remotes.md); the message names
    │   │                        the bucket, the key and the fix
    │   ├── RemoteConfigError    (store.remote.config) no such remote, a bad URL, a fleet key
    │   ├── RemoteAuthError      exit 77: no credentials, wrong ones, or access denied
    │   ├── RemoteUnreachable    exit 75: the endpoint does not answer; try again later
    │   ├── NoSuchBucket         (store.remote.client) the bucket does not exist
    │   ├── RemoteConflict       (store.remote.client) a conditional write lost (412/409)
    │   └── RemoteDataError      (store.remote.layout) an object is missing, corrupt or forged
    └── InstanceError            a named vTPM; status exits 4 (LSB "unknown")
        ├── NoSuchInstance       (store.instances) no instance of that name
        ├── InstanceExists       (store.instances) the name is taken
        ├── InstanceUnreadable   (store.instances) its files are not this user's to read;
        │                        status exits 1
        ├── LifecycleError       (usecases.supervisor) start/stop/rm cannot be done
        ├── MigrateError         (usecases.migrate) export/import cannot be done
        ├── KeyCommandError      (commands.key) the state key cannot be rotated
        ├── EkExportError        (commands.ek) no EK data to export
        ├── OwnershipError       (usecases.ownership) a binding or a replicated state
        │                        cannot be used
        ├── LeaseHeld            exit 5: another host holds the instance's lease in its remote
        └── LeaseLost            exit 6: this host's lease was taken; its writes are refused

Private control-flow exceptions that never reach the user stay outside the
tree (each says why where it is defined).

This module is at the bottom of the layers: it imports nothing from vtpmctl,
and nothing heavy (``cli.run`` imports it on every failure).
"""

# Exit codes of every command but `status` (README.md: 0 ok, 1 failure, 2 usage).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_LEASE_HELD = 5  # another host runs the instance (its lease in the remote)
EXIT_LEASE_LOST = 6  # this host no longer holds the lease it had: its writes were refused
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
# Remotes (sysexits.h): a script retries EX_TEMPFAIL, and asks a person on EX_NOPERM.
EXIT_TEMPFAIL = 75
EXIT_NOPERM = 77

# `status` exits with the LSB init-script status codes.
LSB_RUNNING = 0
LSB_DEAD = 1  # dead, but stale files (pid file, sockets) are left
LSB_STOPPED = 3
LSB_UNKNOWN = 4
LSB_STATUS = {"running": LSB_RUNNING, "stale": LSB_DEAD, "stopped": LSB_STOPPED}


class VtpmctlError(Exception):
    """Root of every error vtpmctl reports; the message is one line for the user."""

    exit_code: int = EXIT_FAILURE
    lsb_code: int = LSB_UNKNOWN


class UsageError(VtpmctlError):
    """Options that cannot go together; nothing was done."""

    exit_code = EXIT_USAGE


class SwtpmOptionError(UsageError):
    """An option value in swtpm's ``key=value,…`` syntax that cannot be used as given."""


class DeviceError(VtpmctlError):
    """The swtpm-compatible device at TARGET cannot be reached or refused a command."""


class TpmResultError(VtpmctlError):
    """A TPM answered with a non-zero return code; ``.rc`` carries it."""

    rc: int


class EngineError(VtpmctlError):
    """The TPM in this process cannot do what was asked."""


class ServeError(VtpmctlError):
    """A TPM cannot be served (daemon, endpoints, CUSE device)."""


class StoreError(VtpmctlError):
    """Bytes at rest (state, keys, CA, snapshots, bundles) cannot be used."""


class RemoteError(VtpmctlError):
    """An S3-compatible remote cannot be used; one line naming the bucket, key and fix."""


class RemoteAuthError(RemoteError):
    """No credentials were found, they are wrong, or they may not do this."""

    exit_code = EXIT_NOPERM


class RemoteUnreachable(RemoteError):
    """The endpoint did not answer (network, DNS, server down); retrying may help."""

    exit_code = EXIT_TEMPFAIL


class InstanceError(VtpmctlError):
    """An operation on a named vTPM failed; the message is one line naming the fix."""


class NoSuchInstance(InstanceError):
    """No instance of that name is registered."""


class InstanceExists(InstanceError):
    """The name is taken by another instance."""


class LeaseHeld(InstanceError):
    """Another host holds the instance's lease: who, until when, and what to do."""

    exit_code = EXIT_LEASE_HELD


class LeaseLost(InstanceError):
    """The lease this host held was taken by another; the write was refused (fencing)."""

    exit_code = EXIT_LEASE_LOST
