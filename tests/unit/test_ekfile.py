"""ek.json: the reader's record and the writer (engine.provision.EkInfo) stay in step."""

from __future__ import annotations

import dataclasses

import pytest

from vtpmctl.engine.provision import EkInfo, EkKey
from vtpmctl.store.ekfile import EkEntry, EkFile, read_ek_file


class Bad(Exception):
    pass


def test_the_record_has_the_fields_the_writer_writes() -> None:
    key = EkKey(0x81010001, "rsa-2048", "pem", None, "0" * 64, None, b"\0\x0b")
    info = EkInfo((key,)).as_dict()
    assert list(info) == [f.name for f in dataclasses.fields(EkFile)]
    assert list(info["eks"][0]) == [f.name for f in dataclasses.fields(EkEntry)]


@pytest.mark.parametrize(
    "text",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b"{}",
        b'{"eks": [], "platform_certificate_pem": null, "locked": "no"}',
        b'{"eks": {}, "platform_certificate_pem": null, "locked": false}',
        b'{"eks": [], "platform_certificate_pem": "x", "locked": false}',
        b'{"eks": [], "platform_certificate_pem": null, "locked": false, "x": 1}',
    ],
)
def test_malformed_ek_json_is_refused_with_one_line(text: bytes) -> None:
    with pytest.raises(Bad) as err:
        read_ek_file(text, Bad)
    assert "\n" not in str(err.value)


def test_empty_ek_json_is_read() -> None:
    ek = read_ek_file(b'{"eks": [], "platform_certificate_pem": null, "locked": false}', Bad)
    assert ek == EkFile()
