"""`vtpmctl remote add|list|rm` against a real S3 server: fleet keys, credentials, errors."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from remote_helpers import Host, hosts, tree, write_key
from s3_server import READER, S3Server

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def two(tmp_path: Path, s3: S3Server, capsys: pytest.CaptureFixture[str]) -> Iterator[list[Host]]:
    with hosts(tmp_path, s3, capsys) as found:
        yield found


def test_add_joins_the_fleet_and_keeps_no_credentials(
    two: list[Host], s3: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    a, b = two
    url = f"s3://{s3_bucket}/fleet/one"
    key = write_key(tmp_path / "fleet.key", os.urandom(32))
    added = a.json("remote", "add", "r", url, "--endpoint", s3.endpoint, "--key-file", str(key))
    assert added["fleet"] == "created" and not added["generated_key"]
    assert s3.keys(s3_bucket).keys() == {"fleet/one/fleet.json"}

    # the second host joins with the same key, given on a descriptor
    fd = os.open(key, os.O_RDONLY)
    try:
        joined = b.json("remote", "add", "r", url, "--endpoint", s3.endpoint, "--key-fd", str(fd))
    finally:
        os.close(fd)
    assert joined["fleet"] == "joined"
    assert joined["remote"]["fleet_key"] == added["remote"]["fleet_key"]
    listed = b.json("remote", "list")["remotes"]
    assert [r["name"] for r in listed] == ["r"] and listed[0]["url"] == url

    # credentials are never written anywhere in the store
    secret = s3.env()["AWS_SECRET_ACCESS_KEY"].encode()
    for host in two:
        assert all(secret not in data for data in tree(host.path).values())
        mode = (host.path / "etc" / "remotes" / "r" / "fleet.key").stat().st_mode
        assert mode & 0o777 == 0o600

    # a third store with another key, or none, is refused and records nothing
    with hosts(tmp_path / "more", s3, a.capsys, n=1) as (c,):
        other = write_key(tmp_path / "other.key", os.urandom(32))
        code, _, err = c.run(
            "remote", "add", "r", url, "--endpoint", s3.endpoint, "--key-file", str(other),
            check=False,
        )  # fmt: skip
        assert code == 1 and "is not the fleet key" in err
        code, _, err = c.run("remote", "add", "r", url, "--endpoint", s3.endpoint, check=False)
        assert code == 1 and "--key-file" in err
        assert c.json("remote", "list")["remotes"] == []

    b.run("remote", "rm", "r")
    assert b.json("remote", "list")["remotes"] == []
    assert not (b.path / "etc" / "remotes" / "r").exists()
    assert "fleet/one/fleet.json" in s3.keys(s3_bucket)  # the bucket is not touched


def test_a_new_remote_gets_a_new_key(two: list[Host], s3: S3Server, s3_bucket: str) -> None:
    a, _ = two
    added = a.json("remote", "add", "r", f"s3://{s3_bucket}", "--endpoint", s3.endpoint)
    assert added["generated_key"] and Path(added["key_file"]).stat().st_mode & 0o077 == 0


def test_errors_name_the_bucket_and_the_fix(
    two: list[Host], s3: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    a, _ = two
    before = tree(a.path)
    ep = ("--endpoint", s3.endpoint)
    cases: list[tuple[list[str], dict[str, str] | None, int, str]] = [
        # wrong secret for a known key id, then an unknown key id
        (
            ["s3://" + s3_bucket],
            s3.env((s3.env()["AWS_ACCESS_KEY_ID"], "not-the-secret")),
            77,
            "refused the credentials",
        ),
        (["s3://" + s3_bucket], s3.env(("NOSUCHKEYID", "x")), 77, "refused the credentials"),
        (["s3://" + s3_bucket], s3.env(None), 77, "no AWS credentials"),
        (["s3://no-such-bucket-here/p"], None, 1, "bucket no-such-bucket-here does not exist"),
        # read-only credentials cannot write fleet.json
        (["s3://" + s3_bucket + "/ro"], s3.env(READER), 77, "access denied"),
    ]
    for url, env, code, text in cases:
        got, _, err = a.run("remote", "add", "r", *url, *ep, check=False, env=env)
        assert (got, text) == (code, text) and text in err, err
        assert err.count("\n") == 1 and "s3://" in err
    # nothing listens there
    got, _, err = a.run(
        "remote", "add", "r", f"s3://{s3_bucket}", "--endpoint", "http://127.0.0.1:9", check=False
    )
    assert got == 75 and "cannot reach http://127.0.0.1:9" in err
    # a profile that is not in the shared files
    got, _, err = a.run(
        "remote", "add", "r", f"s3://{s3_bucket}", *ep, "--profile", "nope", check=False
    )
    assert got == 77 and "profile 'nope'" in err
    got, _, err = a.run("remote", "add", "r", "https://x/y", check=False)
    assert got == 1 and "s3://BUCKET/PREFIX" in err
    assert tree(a.path) == before
    assert a.json("remote", "list")["remotes"] == []
    assert s3.keys(s3_bucket) == {}


def test_a_profile_from_the_shared_files(two: list[Host], s3: S3Server, s3_bucket: str) -> None:
    a, _ = two
    creds = Path(s3.env()["AWS_SHARED_CREDENTIALS_FILE"])
    admin = s3.env()
    creds.write_text(
        f"[fleet]\naws_access_key_id = {admin['AWS_ACCESS_KEY_ID']}\n"
        f"aws_secret_access_key = {admin['AWS_SECRET_ACCESS_KEY']}\n"
    )
    try:
        env = s3.env(None)
        a.run("remote", "add", "r", f"s3://{s3_bucket}", "--endpoint", s3.endpoint,
              "--profile", "fleet", env=env)  # fmt: skip
        assert a.json("remote", "list")["remotes"][0]["profile"] == "fleet"
    finally:
        creds.write_text("")
