"""The S3 backend of :mod:`common.storage`: ``s3://bucket/key`` through boto3.

Imported only when an ``s3://`` URI is used (boto3 is imported here, not by ``common.storage``).

Configuration is the AWS way, resolved by boto3/botocore when the client is first needed:

* credentials: the standard chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
  ``AWS_PROFILE`` with ``~/.aws/credentials`` and ``~/.aws/config``, SSO, container and instance roles);
* region: ``AWS_REGION``, else ``AWS_DEFAULT_REGION`` or the profile's ``region`` (boto3 itself reads
  only the last two); ``us-east-1`` if none is set, so that S3-compatible stores work without one;
* endpoint: :func:`configure` (e.g. from a config key), else ``FEDLINEAR_S3_ENDPOINT_URL``, else what
  botocore resolves natively (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, ``endpoint_url`` in the
  profile). With a custom endpoint botocore uses path-style addressing (``http://host:port/bucket/key``);
* retries: botocore's own retry handler, ``standard`` mode and 3 attempts unless ``AWS_RETRY_MODE`` /
  ``AWS_MAX_ATTEMPTS`` (or ``retry_mode`` / ``max_attempts`` in the profile) say otherwise; connect and
  read timeouts from ``FEDLINEAR_S3_CONNECT_TIMEOUT`` / ``FEDLINEAR_S3_READ_TIMEOUT`` (seconds).

Every boto3/botocore failure becomes one :class:`FedLinearError` line naming the bucket and key and
what to do about it.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import threading
from collections.abc import Iterator
from typing import IO, Any

import boto3
import botocore.exceptions as bce
from botocore.config import Config

from fedlinear.common.errors import FedLinearError

SCHEME = "s3://"
DEFAULT_REGION = "us-east-1"
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 60.0
ENDPOINT_ENV = "FEDLINEAR_S3_ENDPOINT_URL"
CONNECT_TIMEOUT_ENV = "FEDLINEAR_S3_CONNECT_TIMEOUT"
READ_TIMEOUT_ENV = "FEDLINEAR_S3_READ_TIMEOUT"
# The file whose arrival marks a published SavedModel as complete (uploaded last).
COMPLETION_MARKER = "saved_model.pb"
_STREAM_BUFFER = 1 << 18
_PAGE_SIZE = 1000  # keys per list_objects_v2 page (S3's maximum)
_ENDPOINT_VARS = f"{ENDPOINT_ENV} / AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL"
_CREDENTIAL_HELP = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE naming a profile in "
    "~/.aws/credentials or ~/.aws/config (paths from AWS_SHARED_CREDENTIALS_FILE / AWS_CONFIG_FILE), "
    "or run with an instance/container role"
)


class _SetupError(FedLinearError):
    """The client could not be built (bad profile, endpoint, timeout setting); prefixed with the URI."""


_lock = threading.Lock()
_endpoint_override: str | None = None
_state: dict[str, Any] = {}  # {"pid", "client", "session"}: one client per process


# --------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------


def configure(endpoint_url: str | None = None) -> None:
    """Set (or with ``None`` clear) an explicit endpoint URL; it wins over every environment variable.

    The cached client is dropped, so the next call builds one with the new setting.
    """
    global _endpoint_override
    with _lock:
        _endpoint_override = endpoint_url or None
        _state.clear()


def reset_client() -> None:
    """Forget the cached client (e.g. after changing AWS_* environment variables)."""
    with _lock:
        _state.clear()


def _timeout(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise _SetupError(f"environment variable {name} must be a positive number of seconds, got '{raw}'")
    return value


def _client():
    """The process's S3 client (built on first use; rebuilt after a fork)."""
    with _lock:
        if _state.get("pid") == os.getpid():
            return _state["client"]
        endpoint = _endpoint_override or os.environ.get(ENDPOINT_ENV, "").strip() or None
        config = Config(
            connect_timeout=_timeout(CONNECT_TIMEOUT_ENV, DEFAULT_CONNECT_TIMEOUT),
            read_timeout=_timeout(READ_TIMEOUT_ENV, DEFAULT_READ_TIMEOUT),
            user_agent_extra="fedlinear",
            # No `retries` here: botocore then honours AWS_RETRY_MODE / AWS_MAX_ATTEMPTS and the profile's
            # retry_mode / max_attempts, defaulting to standard mode with 3 attempts.
        )
        try:
            session = boto3.session.Session()
            # boto3 reads AWS_DEFAULT_REGION and the profile's region; AWS_REGION (AWS CLI v2 and the other
            # SDKs) is honoured too and wins, as in the AWS CLI.
            region = os.environ.get("AWS_REGION", "").strip() or session.region_name or DEFAULT_REGION
            client = session.client("s3", region_name=region, endpoint_url=endpoint, config=config)
        except bce.ProfileNotFound as exc:
            raise _SetupError(
                f"AWS profile '{exc.kwargs.get('profile')}' (from AWS_PROFILE) is not defined in "
                "~/.aws/config or ~/.aws/credentials: fix AWS_PROFILE or add the profile"
            ) from None
        except ValueError as exc:  # botocore: "Invalid endpoint: ..."
            raise _SetupError(
                f"invalid S3 endpoint URL ({exc}): expected e.g. http://127.0.0.1:9000; "
                f"check {_ENDPOINT_VARS} (or the endpoint_url in the AWS profile)"
            ) from None
        except bce.BotoCoreError as exc:
            raise _SetupError(f"cannot configure the S3 client: {exc}") from None
        _state.update(pid=os.getpid(), client=client, session=session)
        return client


def endpoint_url() -> str:
    """The endpoint the client talks to (for messages)."""
    return _client().meta.endpoint_url


def _max_attempts() -> int:
    retries = _client().meta.config.retries or {}
    if "total_max_attempts" in retries:
        return int(retries["total_max_attempts"])
    return 5 if retries.get("mode") == "legacy" else 3


def _credential_source() -> str:
    """'access key AKIA...WXYZ from env' or similar (never the secret)."""
    try:
        creds = _state["session"].get_credentials()
        key = creds.access_key if creds is not None else None
    except Exception:  # noqa: BLE001 - only for a message
        return "the credentials in use"
    if not key:
        return "the credentials in use"
    shown = key if len(key) <= 8 else f"{key[:4]}...{key[-4:]}"
    return f"access key {shown} (from {getattr(creds, 'method', 'unknown source')})"


# --------------------------------------------------------------------------------------------
# URIs and errors
# --------------------------------------------------------------------------------------------


def split(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)`` (the key may be empty or end in ``/`` for a prefix)."""
    if not uri.startswith(SCHEME):
        raise FedLinearError(f"{uri}: not an s3:// URI, expected s3://bucket/key")
    bucket, _, key = uri[len(SCHEME) :].partition("/")
    if not bucket:
        raise FedLinearError(f"{uri}: no bucket name, expected s3://bucket/key")
    return bucket, key


def _object(uri: str) -> tuple[str, str]:
    bucket, key = split(uri)
    if not key or key.endswith("/"):
        raise FedLinearError(f"{uri}: expected an object s3://bucket/key, got a bucket or a prefix")
    return bucket, key


def _name(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


_NOT_FOUND = {"404", "NotFound", "NoSuchKey"}
_DENIED = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "AccountProblem"}
_EXPIRED = {"ExpiredToken", "ExpiredTokenException", "InvalidToken", "TokenRefreshRequired", "RequestExpired"}
_REGION = {"PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException", "301"}


def _bucket_missing(bucket: str) -> bool:
    """After a bare 404 from HEAD: is it the bucket that is missing (rather than the key)?"""
    try:
        _client().head_bucket(Bucket=bucket)
    except bce.ClientError as exc:
        return exc.response.get("Error", {}).get("Code") in {"404", "NoSuchBucket", "NotFound"}
    except bce.BotoCoreError:
        return False
    return False


def _translate(exc: Exception, bucket: str, key: str, action: str) -> FedLinearError:
    """One line naming bucket and key, what went wrong and what to do."""
    name = _name(bucket, key)
    where = f"bucket '{bucket}', key '{key}'"
    try:
        endpoint = endpoint_url()
    except FedLinearError:
        endpoint = "the S3 endpoint"
    if isinstance(exc, bce.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "")) or "Unknown"
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        text = error.get("Message") or ""
        if code == "NoSuchBucket" or (code in {"404", "NotFound"} and _bucket_missing(bucket)):
            return FedLinearError(
                f"{name}: no such bucket '{bucket}' at {endpoint} (while trying to {action} key '{key}'): "
                "check the bucket name, the region and the endpoint, or create the bucket"
            )
        if code in _NOT_FOUND:
            return FedLinearError(
                f"{name}: no such key '{key}' in bucket '{bucket}' (while trying to {action} it): "
                "check the URI (aws s3 ls) or upload the object first"
            )
        if code == "InvalidAccessKeyId":
            return FedLinearError(
                f"{name}: bad credentials: {_credential_source()} is not known to {endpoint} "
                f"({action} {where}): fix AWS_ACCESS_KEY_ID / AWS_PROFILE / ~/.aws/credentials"
            )
        if code == "SignatureDoesNotMatch":
            return FedLinearError(
                f"{name}: bad credentials: the secret key does not match {_credential_source()} "
                f"({action} {where}): fix AWS_SECRET_ACCESS_KEY / AWS_PROFILE / ~/.aws/credentials"
            )
        if code in _EXPIRED:
            return FedLinearError(
                f"{name}: the AWS credentials have expired or are invalid ({code}; {action} {where}): "
                "refresh them (new AWS_SESSION_TOKEN, `aws sso login`, ...)"
            )
        if code in _DENIED:
            maybe = " or the credentials are invalid" if code in {"403", "Forbidden"} else ""
            return FedLinearError(
                f"{name}: access denied to {action} {where} for {_credential_source()}{maybe}: "
                "grant it in the IAM or bucket policy, or use other credentials (AWS_PROFILE)"
            )
        if code in _REGION:
            return FedLinearError(
                f"{name}: bucket '{bucket}' is not reachable in the configured region ({code}; {action} key "
                f"'{key}'): set AWS_REGION to the bucket's region"
            )
        if code in {"PreconditionFailed", "412"}:
            return FedLinearError(
                f"{name}: the object changed while it was being read ({action} {where}): try again"
            )
        if code == "InvalidBucketName":
            return FedLinearError(f"{name}: '{bucket}' is not a valid bucket name: {text}")
        if isinstance(status, int) and status >= 500 or code in {"SlowDown", "RequestTimeout", "Throttling"}:
            return FedLinearError(
                f"{name}: {endpoint} answered {code} (HTTP {status}) after {_max_attempts()} attempts "
                f"({action} {where}): try again later, or raise AWS_MAX_ATTEMPTS"
            )
        return FedLinearError(f"{name}: S3 refused to {action} {where}: {code} (HTTP {status}) {text}".rstrip())
    if isinstance(exc, bce.NoCredentialsError):
        return FedLinearError(f"{name}: no AWS credentials found to {action} {where}: {_CREDENTIAL_HELP}")
    if isinstance(exc, bce.PartialCredentialsError | bce.CredentialRetrievalError):
        return FedLinearError(f"{name}: incomplete or unusable AWS credentials ({exc}): {_CREDENTIAL_HELP}")
    if isinstance(exc, bce.ProfileNotFound):
        return FedLinearError(f"{name}: {exc}: fix AWS_PROFILE or add the profile to ~/.aws/config")
    if isinstance(exc, bce.SSLError):
        return FedLinearError(
            f"{name}: TLS error talking to {endpoint} ({action} {where}): {exc}; check the endpoint URL "
            "and AWS_CA_BUNDLE"
        )
    if isinstance(exc, bce.ReadTimeoutError):
        return FedLinearError(
            f"{name}: {endpoint} did not answer in time ({action} {where}, {_max_attempts()} attempts): "
            f"try again, or raise {READ_TIMEOUT_ENV}"
        )
    if isinstance(exc, bce.ConnectionError):
        # EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError, ProxyConnectionError
        return FedLinearError(
            f"{name}: cannot reach the S3 endpoint {endpoint} after {_max_attempts()} attempts "
            f"({action} {where}): check that it is up and the URL is right ({_ENDPOINT_VARS}), "
            "or the network/proxy"
        )
    if isinstance(exc, bce.FlexibleChecksumError):
        return FedLinearError(
            f"{name}: checksum mismatch while reading {where} from {endpoint} ({exc}): the data was corrupted in "
            "transit, try again (for stores without checksum support: AWS_RESPONSE_CHECKSUM_VALIDATION=when_required)"
        )
    if isinstance(exc, bce.ResponseStreamingError | bce.IncompleteReadError | bce.ConnectionClosedError):
        return FedLinearError(
            f"{name}: the connection to {endpoint} broke ({action} {where}, {_max_attempts()} attempts): "
            "try again"
        )
    if isinstance(exc, bce.ParamValidationError):
        if "Invalid bucket name" in str(exc):
            return FedLinearError(
                f"{name}: '{bucket}' is not a valid S3 bucket name (3-63 characters: lowercase letters, digits, "
                "'.' and '-'): fix the URI"
            )
        return FedLinearError(f"{name}: invalid S3 request to {action} {where}: {' '.join(str(exc).split())}")
    return FedLinearError(f"{name}: S3 failed to {action} {where}: {type(exc).__name__}: {exc}")


@contextlib.contextmanager
def _errors(bucket: str, key: str, action: str) -> Iterator[None]:
    """Turn boto3/botocore failures inside the block into FedLinearError (no traceback chain)."""
    try:
        yield
    except _SetupError as exc:
        raise FedLinearError(f"{_name(bucket, key)}: {exc}") from None
    except (bce.ClientError, bce.BotoCoreError) as exc:
        raise _translate(exc, bucket, key, action) from None


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class _BodyReader(io.RawIOBase):
    """A raw stream over a botocore StreamingBody that maps its errors.

    Wrapped in :class:`io.BufferedReader` it behaves like a local file opened with ``open(path, "rb")``:
    iteration yields lines split on ``\\n`` only, each with its line ending, the last one with or
    without a newline, so line numbers match the local loader exactly (CRLF included).
    """

    def __init__(self, body: Any, bucket: str, key: str) -> None:
        super().__init__()
        self._body = body
        self._bucket = bucket
        self._key = key

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        with _errors(self._bucket, self._key, "read"):
            return self._body.readinto(buffer)

    def readall(self) -> bytes:
        # One read of the rest of the body: the object is held in memory once, not copied chunkwise.
        with _errors(self._bucket, self._key, "read"):
            return self._body.read()

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):
                self._body.close()
        super().close()


@contextlib.contextmanager
def open_binary(uri: str) -> Iterator[IO[bytes]]:
    """Stream an object: a binary file object (``read()``, ``readline()``, iteration by line)."""
    bucket, key = _object(uri)
    with _errors(bucket, key, "read"):
        response = _client().get_object(Bucket=bucket, Key=key)
    with io.BufferedReader(_BodyReader(response["Body"], bucket, key), buffer_size=_STREAM_BUFFER) as stream:
        yield stream


def exists(uri: str) -> bool:
    """True if the object exists (False on 404, including a missing bucket)."""
    bucket, key = _object(uri)
    with _errors(bucket, key, "check"):
        try:
            _client().head_object(Bucket=bucket, Key=key)
        except bce.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NotFound", "NoSuchKey", "NoSuchBucket"}:
                return False
            raise
    return True


def fingerprint(uri: str) -> dict:
    """``{"uri", "etag", "size"}`` from HEAD (the ETag without quotes; multipart ETags end in ``-N``)."""
    bucket, key = _object(uri)
    with _errors(bucket, key, "check"):
        head = _client().head_object(Bucket=bucket, Key=key)
    return {"uri": uri, "etag": str(head.get("ETag", "")).strip('"'), "size": int(head["ContentLength"])}


def _list(bucket: str, prefix: str, delimiter: str | None) -> list[dict]:
    kwargs = {"Bucket": bucket, "Prefix": prefix}
    if delimiter:
        kwargs["Delimiter"] = delimiter
    objects = []
    with _errors(bucket, prefix, "list"):
        paginator = _client().get_paginator("list_objects_v2")
        for page in paginator.paginate(**kwargs, PaginationConfig={"PageSize": _PAGE_SIZE}):
            objects.extend(page.get("Contents", []))
    return objects


def list_uris(prefix_uri: str) -> list[str]:
    """The objects directly under a prefix ending in ``/``, sorted, like the files of a local directory.

    Directory markers (keys ending in ``/``), deeper "subdirectories" and names starting with ``.``
    are skipped, as the local backend skips subdirectories and hidden files.
    """
    bucket, key = split(prefix_uri)
    if key and not key.endswith("/"):
        raise FedLinearError(f"{prefix_uri}: a prefix must end in '/'")
    uris = []
    for obj in _list(bucket, key, "/"):
        name = obj["Key"][len(key) :]
        if not name or name.endswith("/") or name.startswith("."):
            continue
        uris.append(_name(bucket, obj["Key"]))
    return sorted(uris)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def write_bytes(uri: str, data: bytes) -> None:
    """PUT the object; S3 makes it visible whole or not at all."""
    bucket, key = _object(uri)
    with _errors(bucket, key, "write"):
        _client().put_object(Bucket=bucket, Key=key, Body=data)


def _upload(path: str, bucket: str, key: str) -> None:
    with open(path, "rb") as handle, _errors(bucket, key, "write"):
        _client().put_object(Bucket=bucket, Key=key, Body=handle)


def _delete(bucket: str, keys: list[str]) -> None:
    for start in range(0, len(keys), 1000):
        batch = keys[start : start + 1000]
        with _errors(bucket, batch[0], "delete"):
            response = _client().delete_objects(
                Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
            )
        for failure in response.get("Errors", []):
            raise FedLinearError(
                f"{_name(bucket, failure.get('Key', '?'))}: could not delete stale object: "
                f"{failure.get('Code')} {failure.get('Message', '')}".rstrip()
            )


def _prefix(uri: str) -> tuple[str, str]:
    bucket, key = split(uri)
    key = key.rstrip("/")
    return bucket, (key + "/" if key else "")


def publish_dir(local_dir: str, uri: str) -> None:
    """Upload a finished local directory (a SavedModel) under the prefix ``uri/``.

    S3 has no atomic rename, so ``saved_model.pb`` marks completeness:

    1. the old ``saved_model.pb`` (if any) is deleted: from now on the prefix is not a SavedModel;
    2. every other new file is uploaded (overwriting the old ones);
    3. objects under the prefix that the new model does not have are deleted;
    4. ``saved_model.pb`` is uploaded last.

    A reader sees the old complete model, then "no saved_model.pb" (not a model), then the new complete
    model; never a ``saved_model.pb`` next to a mix of old and new files. If the upload fails midway the
    prefix is left without ``saved_model.pb``. A reader that was downloading the old model while step 1-4
    ran gets an error from :func:`download_dir` (objects are fetched with If-Match on the listed ETags).
    """
    bucket, prefix = _prefix(uri)
    if not os.path.isdir(local_dir):
        raise FedLinearError(f"{local_dir}: no such directory to publish to {uri}")
    files: dict[str, str] = {}
    for root, _dirs, names in os.walk(local_dir):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, local_dir).replace(os.sep, "/")
            files[prefix + rel] = path
    marker = prefix + COMPLETION_MARKER
    existing = {obj["Key"] for obj in _list(bucket, prefix, None)}
    if marker in existing:
        _delete(bucket, [marker])
    for key in sorted(k for k in files if k != marker):
        _upload(files[key], bucket, key)
    stale = sorted(k for k in existing if k not in files and k != marker)
    if stale:
        _delete(bucket, stale)
    if marker in files:
        _upload(files[marker], bucket, marker)


def download_dir(uri: str, local_dir: str) -> None:
    """Download every object under the prefix ``uri/`` into ``local_dir`` (keeping relative paths).

    Each object is fetched with If-Match on the ETag seen in the listing, so a model being replaced
    while it is downloaded fails with a message instead of mixing old and new files.
    """
    bucket, prefix = _prefix(uri)
    objects = [obj for obj in _list(bucket, prefix, None) if not obj["Key"].endswith("/")]
    if not objects:
        raise FedLinearError(f"{uri}: no objects under s3://{bucket}/{prefix} (bucket '{bucket}', prefix '{prefix}')")
    root = os.path.abspath(local_dir)
    for obj in objects:
        key = obj["Key"]
        rel = key[len(prefix) :]
        dest = os.path.abspath(os.path.join(root, *rel.split("/")))
        if not dest.startswith(root + os.sep):
            raise FedLinearError(f"{_name(bucket, key)}: key escapes the download directory, refusing it")
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with _errors(bucket, key, "read"):
            try:
                response = _client().get_object(Bucket=bucket, Key=key, IfMatch=obj["ETag"])
                with open(dest, "wb") as handle:
                    shutil.copyfileobj(response["Body"], handle, 1 << 20)
            except bce.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in {"PreconditionFailed", "412", "NoSuchKey", "404"}:
                    raise FedLinearError(
                        f"{_name(bucket, key)}: changed while {uri} was being downloaded (a new version is "
                        f"being published under bucket '{bucket}', prefix '{prefix}'): try again"
                    ) from None
                raise


def list_tree(prefix_uri: str) -> list[str]:
    """Every object under a prefix (recursively: keys with ``/`` below it too), sorted, as URIs."""
    bucket, prefix = _prefix(prefix_uri)
    return sorted(_name(bucket, obj["Key"]) for obj in _list(bucket, prefix, None) if not obj["Key"].endswith("/"))
