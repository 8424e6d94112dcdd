"""swtpm's command line as the compatible program reads it (no TPM is started here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vtpmctl.compat.swtpm import SwtpmError, _json_line, main, parse_args


def test_proxmox_line() -> None:
    opts = parse_args(
        ["socket", "--tpmstate", "backend-uri=file:///dev/zvol/x,mode=0600",
         "--ctrl", "type=unixio,path=/run/qemu-server/101.swtpm,mode=0600",
         "--pid", "file=/run/qemu-server/101.swtpm.pid", "--terminate", "--daemon",
         "--log", "file=/run/qemu-server/101-swtpm.log,level=1,prefix=[id=101]", "--tpm2"],
        "swtpm",
    )  # fmt: skip
    assert opts.tpmstate is not None
    assert (opts.tpmstate.backend, opts.tpmstate.path) == ("file", Path("/dev/zvol/x"))
    assert opts.tpmstate.mode == 0o600 and opts.tpmstate.lock is False  # file: off by default
    assert opts.ctrl is not None and opts.ctrl.mode == 0o600
    assert opts.terminate and opts.daemon and opts.tpm2
    assert opts.log.prefix == "[id=101]" and opts.log.level == 1


def test_short_options_and_spellings() -> None:
    opts = parse_args(["socket", "-dt", "-p2321", "--tpmstate=dir=/s", "--tpm2"], "swtpm")
    assert opts.daemon and opts.terminate
    assert opts.server is not None and opts.server.port == 2321 and opts.server.disconnect
    assert opts.tpmstate is not None and opts.tpmstate.lock  # dir: on by default
    opts = parse_args(["socket", "--tpmst", "dir=/s", "--ctrl", "type=unixio,fd=3"], "swtpm")
    assert opts.ctrl is not None and opts.ctrl.fd == 3 and opts.server is None


def test_flags_and_locality() -> None:
    opts = parse_args(
        ["chardev", "--fd", "4", "--tpmstate", "dir=/s",
         "--flags", "not-need-init,startup-deactivated", "--locality", "allow-set-locality"],
        "swtpm",
    )  # fmt: skip
    assert opts.startup == "deactivated" and opts.allow_set_locality and opts.data_fd == 4
    assert not opts.terminate  # --fd implies -t for socket only


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["socket", "--ctrl", "type=foo"], "Unsupport control channel type: foo"),
        (["socket", "--ctrl", "type=unixio,fd=3,clientfd=4"], "mutually exclusive"),
        (["socket", "--tpm2", "--flags", "startup-deactivated", "--ctrl", "type=unixio,fd=3"],
         "only valid for a TPM 1.2"),
        (["socket", "--tpmstate", "backend-uri=nfs://x", "-p", "1"], "Unsupported backend"),
        (["socket", "--tpmstate", "dir=/s,mode=644", "-p", "1"], "octal number"),
        (["socket", "--seccomp", "action=trap", "-p", "1"], "seccomp"),
        (["cuse", "-p", "1"], "cuse: invalid option -- 'p'"),
        (["cuse", "--port", "1"], "cuse: unrecognized option '--port'"),
        (["socket", "--tpmstate", "dir=/s,bogus=1", "-p", "1"], "Unknown parameter 'bogus'"),
    ],
)  # fmt: skip
def test_refused_values(argv: list[str], message: str) -> None:
    with pytest.raises(SwtpmError, match=message) as info:
        parse_args(argv, "swtpm")
    assert info.value.exit_code == 1


def test_usage_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["socket", "--bogus"]) == 1
    assert "unrecognized option '--bogus'" in capsys.readouterr().err
    assert main([]) == 1
    assert "Missing TPM interface type" in capsys.readouterr().err
    assert main(["socket", "--help"]) == 0
    assert main(["socket", "--tpm2", "--print-states"]) == 1
    assert "--tpmstate option is required" in capsys.readouterr().err


def test_json_spacing_is_swtpms() -> None:
    assert _json_line({"type": "swtpm", "features": ["a", "b"], "version": "0.7.1"}) == (
        '{ "type": "swtpm", "features": [ "a", "b" ], "version": "0.7.1" }'
    )
