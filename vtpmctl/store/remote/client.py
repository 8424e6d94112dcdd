"""The one S3 client of vtpmctl: boto3 behind a small API, every failure a RemoteError.

``RemoteClient(remote)`` makes a boto3 client from the standard AWS chain
(environment, shared config and credentials files, ``remote.profile``) and
the remote's endpoint and region; boto3 is imported there, never at import
time, so only the commands that talk to a remote pay for it. Calls:

``get(key) -> bytes | None``              None when the object does not exist
``get_etag(key) -> (bytes, etag) | None`` the content and the ETag to make a conditional write on
``head(key) -> ObjectInfo | None``
``put(key, data, if_none_match=False, if_match=None) -> etag``
                                           ``if_none_match``: create only (If-None-Match: *);
                                           ``if_match``: replace only that version (If-Match);
                                           a lost condition raises RemoteConflict
``delete(key)``                            (absent is fine)
``list(prefix) -> list[ObjectInfo]``       every object under ``prefix``, paginated, with
                                           its size, ETag and LastModified
``check_bucket()``                         the bucket exists and these credentials may list it

Errors (docs/remotes.md lists them with their exit codes): RemoteAuthError
(no credentials, wrong ones, access denied; exit 77), RemoteUnreachable
(connection refused, DNS, timeouts, 5xx after retries; exit 75), NoSuchBucket,
RemoteConflict (412/409 on a conditional write). Each message names the
remote, ``s3://bucket/key`` and the fix. Credentials never appear in them.

Clients are cached per process, keyed by the remote's endpoint, region and
profile and by the AWS_* environment: making a boto3 session costs about
0.3 s, more than a whole push, and a daemon or a loop over many instances
would pay it every time.

Timeouts and retries are short (``CONNECT_TIMEOUT``, ``READ_TIMEOUT``,
``ATTEMPTS``): a command fails within seconds when the endpoint is down.
Request checksums are sent only when an operation requires them, for the
S3-compatible servers (older Ceph RGW, MinIO) that reject the newer ones.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vtpmctl.errors import RemoteAuthError, RemoteError, RemoteUnreachable
from vtpmctl.store.remote.config import Remote

if TYPE_CHECKING:
    from collections.abc import Callable

CONNECT_TIMEOUT = 3.0
READ_TIMEOUT = 20.0
ATTEMPTS = 3
DEFAULT_REGION = "us-east-1"  # what S3-compatible servers accept when none is configured

_AUTH_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "InvalidSecurity",
    }
)
_DENIED_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "AccountProblem"})
_CONFLICT_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412"})


_CACHE: dict[tuple[Any, ...], Any] = {}
_CACHE_LOCK = threading.Lock()


class NoSuchBucket(RemoteError):
    """The remote's bucket does not exist at its endpoint."""


class RemoteConflict(RemoteError):
    """A conditional write lost: the object exists (If-None-Match) or changed (If-Match)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    modified: float | None = None  # LastModified, seconds since the epoch (None: not known)


class RemoteClient:
    """One remote's bucket, through boto3; see the module docstring for the calls."""

    def __init__(self, remote: Remote) -> None:
        self.remote = remote
        self.bucket = remote.bucket
        self._s3 = self._make_client()

    # ------------------------------------------------------------ setup

    def _make_client(self) -> Any:
        r = self.remote
        env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
        key = (r.endpoint, r.region, r.profile, env)
        with _CACHE_LOCK:
            client = _CACHE.get(key)
            if client is None:
                client = _CACHE[key] = self._new_client()
        return client

    def _new_client(self) -> Any:
        import boto3
        import botocore.config
        import botocore.exceptions

        try:
            session = boto3.session.Session(profile_name=self.remote.profile)
        except botocore.exceptions.ProfileNotFound:
            raise RemoteAuthError(
                f"AWS profile {self.remote.profile!r} of remote {self.remote.name} is not in "
                "the shared config or credentials files (~/.aws/config, ~/.aws/credentials, "
                "or AWS_CONFIG_FILE/AWS_SHARED_CREDENTIALS_FILE); add it there"
            ) from None
        config = botocore.config.Config(
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            retries={"max_attempts": ATTEMPTS, "mode": "standard"},
            s3={"addressing_style": "path" if self.remote.endpoint else "auto"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            user_agent_extra="vtpmctl",
        )
        try:
            return session.client(
                "s3",
                endpoint_url=self.remote.endpoint,
                region_name=self.remote.region or session.region_name or DEFAULT_REGION,
                config=config,
            )
        except ValueError as exc:  # a malformed endpoint URL
            raise RemoteError(
                f"remote {self.remote.name}: bad endpoint {self.remote.endpoint!r} ({exc}); "
                "give --endpoint as http(s)://HOST[:PORT]"
            ) from None

    # ------------------------------------------------------------ errors

    @property
    def _endpoint(self) -> str:
        return str(self._s3.meta.endpoint_url)

    def _translate(self, exc: Exception, action: str, key: str | None) -> RemoteError:
        """The RemoteError a botocore failure means, naming the bucket, key and fix."""
        import botocore.exceptions as bx

        where = self.remote.where(key)
        name = self.remote.name
        if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
            return RemoteAuthError(
                f"no AWS credentials to {action} {where} (remote {name}): set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or add the keys "
                "to ~/.aws/credentials (vtpmctl never stores them)"
            )
        if isinstance(exc, bx.ClientError):
            return self._translate_reply(exc, action, key)
        if isinstance(
            exc,
            bx.EndpointConnectionError
            | bx.ConnectTimeoutError
            | bx.ReadTimeoutError
            | bx.ConnectionClosedError
            | bx.HTTPClientError,
        ):
            return RemoteUnreachable(
                f"cannot reach {self._endpoint} to {action} {where} (remote {name}): "
                f"{_short(exc)}; check the network and the remote's endpoint, then try again"
            )
        if isinstance(exc, bx.BotoCoreError):
            return RemoteError(f"cannot {action} {where} (remote {name}): {_short(exc)}")
        raise exc

    def _translate_reply(self, exc: Any, action: str, key: str | None) -> RemoteError:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        where = self.remote.where(key)
        name = self.remote.name
        if code in _CONFLICT_CODES or status == 412:
            return RemoteConflict(
                f"{where} changed while vtpmctl wrote it ({code or status}): another host "
                "wrote it first; look again and retry"
            )
        if code == "NoSuchBucket" or (key is None and status == 404):
            return NoSuchBucket(
                f"bucket {self.bucket} does not exist at {self._endpoint} (remote {name}): "
                f"create it (aws s3 mb s3://{self.bucket}) or fix the remote's URL "
                f"(vtpmctl remote rm {name}; vtpmctl remote add {name} s3://BUCKET/PREFIX …)"
            )
        if code in _AUTH_CODES:
            return RemoteAuthError(
                f"{self._endpoint} refused the credentials used to {action} {where} (remote "
                f"{name}; {code}): check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE "
                "or the profile's keys in ~/.aws/credentials"
            )
        if code in _DENIED_CODES or status == 403:
            return RemoteAuthError(
                f"access denied to {action} {where} (remote {name}; {code or status}): the "
                "credentials are wrong or may not do this; grant them s3:GetObject, "
                "s3:PutObject, s3:DeleteObject and s3:ListBucket on the bucket, or use others"
            )
        if status >= 500 or code in ("SlowDown", "ServiceUnavailable", "InternalError"):
            return RemoteUnreachable(
                f"{self._endpoint} failed to {action} {where} (remote {name}; "
                f"{code or status}); try again later"
            )
        message = " ".join(str(error.get("Message", "")).split())[:200]
        return RemoteError(
            f"cannot {action} {where} (remote {name}): {code or status} {message}".rstrip()
        )

    def _call(self, action: str, key: str | None, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:
            raise self._translate(exc, action, key) from None

    @staticmethod
    def _missing(exc: Any) -> bool:
        """A 404 for the object (not for the bucket)."""
        import botocore.exceptions as bx

        if not isinstance(exc, bx.ClientError):
            return False
        code = str(exc.response.get("Error", {}).get("Code", ""))
        return code in ("NoSuchKey", "404", "NotFound")

    # ------------------------------------------------------------ calls

    def get_etag(self, key: str) -> tuple[bytes, str] | None:
        try:
            reply = self._s3.get_object(Bucket=self.bucket, Key=key)
            return reply["Body"].read(), str(reply["ETag"])
        except Exception as exc:
            if self._missing(exc):
                return None
            raise self._translate(exc, "read", key) from None

    def get(self, key: str) -> bytes | None:
        found = self.get_etag(key)
        return None if found is None else found[0]

    def head(self, key: str) -> ObjectInfo | None:
        try:
            reply = self._s3.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            if self._missing(exc):
                return None
            raise self._translate(exc, "look at", key) from None
        return ObjectInfo(
            key, int(reply["ContentLength"]), str(reply["ETag"]), _epoch(reply.get("LastModified"))
        )

    def put(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        """Write ``data`` at ``key``; returns the new ETag."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Body": data}
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        reply = self._call("write", key, lambda: self._s3.put_object(**kwargs))
        return str(reply.get("ETag", ""))

    def delete(self, key: str) -> None:
        self._call("delete", key, lambda: self._s3.delete_object(Bucket=self.bucket, Key=key))

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix``."""

        def pages() -> list[ObjectInfo]:
            found: list[ObjectInfo] = []
            paginator = self._s3.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    found.append(
                        ObjectInfo(
                            obj["Key"],
                            int(obj["Size"]),
                            str(obj.get("ETag")),
                            _epoch(obj.get("LastModified")),
                        )
                    )
            return found

        result: list[ObjectInfo] = self._call("list", prefix, pages)
        return result

    def check_bucket(self) -> None:
        """The bucket exists and these credentials may list it."""
        self._call(
            "list",
            self.remote.prefix + "/" if self.remote.prefix else "",
            lambda: self._s3.list_objects_v2(
                Bucket=self.bucket, Prefix=self.remote.key(""), MaxKeys=1
            ),
        )


def _epoch(when: Any) -> float | None:
    """A LastModified (a datetime from botocore) in seconds since the epoch."""
    try:
        return float(when.timestamp())
    except (AttributeError, TypeError, ValueError, OSError):
        return None


def _short(exc: Exception) -> str:
    """One line of a botocore message, without the URL's query (never holds secrets anyway)."""
    return " ".join(str(exc).split())[:200]


__all__ = ["ObjectInfo", "RemoteClient", "RemoteConflict", "NoSuchBucket"]
