"""Token stores in S3-compatible object storage: obstore for the requests, botocore for the
AWS configuration.

Why obstore (measured in benchmarks/s3_clients.py, figures in docs/performance.md): against the
same server it spends about a quarter of s3fs's client CPU per ranged GET (the training ranks'
data thread shares their cores), imports in 0.04 s instead of 0.5 s, has conditional puts as
first-class modes (create-only and If-Match, which build claims need; s3fs has only create),
and retries connection errors, dropped connections (mid-body too), timeouts and 5xx answers
with backoff by itself. What it does not do is read ~/.aws: so botocore, the AWS SDK's own
resolver, finds endpoint, region and credentials exactly as the aws CLI would:

- endpoint: AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, then `endpoint_url` in the profile's
  `services` section or the profile itself (~/.aws/config);
- region: AWS_DEFAULT_REGION or the profile's `region` (default us-east-1);
- credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN, AWS_PROFILE in
  ~/.aws/credentials and ~/.aws/config (AWS_SHARED_CREDENTIALS_FILE, AWS_CONFIG_FILE), SSO,
  assume-role and credential_process profiles, then container and instance roles. Credentials
  that expire are refreshed through botocore.

Retries: ZEROFORGE_S3_RETRIES (default 5) with exponential backoff from 0.2 s; what still fails
becomes one StorageError line naming the object.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import threading

import botocore.configprovider
import botocore.credentials
import botocore.exceptions
import botocore.session
import obstore
import zarr.storage
from obstore.exceptions import (
    AlreadyExistsError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
)
from obstore.store import S3Store

from .storage import ObjectMissing, Storage, StorageError, WriteConflict

# botocore logs where it found the endpoint and the credentials at INFO, on every open.
for _name in ("botocore.configprovider", "botocore.credentials"):
    logging.getLogger(_name).setLevel(logging.WARNING)

RETRIES_ENV = "ZEROFORGE_S3_RETRIES"
DEFAULT_RETRIES = 5
_XML_FIELD = re.compile(r"<(Code|Message)>([^<]*)</\1>")


def _retries() -> int:
    value = os.environ.get(RETRIES_ENV, str(DEFAULT_RETRIES))
    if not value.isdigit():
        raise StorageError(f"{RETRIES_ENV} must be a whole number, got {value!r}")
    return int(value)


class _AwsConfig:
    """Endpoint, region and credentials as the AWS SDK resolves them (see the module doc)."""

    def __init__(self, location: str):
        try:
            session = botocore.session.get_session()
            self.region = session.get_config_variable("region") or "us-east-1"
            self.endpoint = None
            if not session.get_config_variable("ignore_configured_endpoint_urls"):
                self.endpoint = botocore.configprovider.ConfiguredEndpointProvider(
                    full_config=session.full_config,
                    scoped_config=session.get_scoped_config(),
                    client_name="s3",
                ).provide()
            self.credentials = session.get_credentials()
        except botocore.exceptions.BotoCoreError as exc:
            raise StorageError(f"{location}: AWS configuration: {exc}") from exc
        if self.credentials is None:
            raise StorageError(
                f"{location}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with ~/.aws/credentials")

    def store_options(self) -> dict:
        creds = self.credentials
        options: dict = {"region": self.region}
        if self.endpoint:
            options["endpoint"] = self.endpoint
            options["client_options"] = {"allow_http": self.endpoint.startswith("http://")}
        if isinstance(creds, botocore.credentials.RefreshableCredentials):
            options["credential_provider"] = self._provide
        else:
            frozen = creds.get_frozen_credentials()
            options["access_key_id"] = frozen.access_key
            options["secret_access_key"] = frozen.secret_key
            if frozen.token:
                options["token"] = frozen.token
        return options

    def _provide(self) -> dict:
        # botocore refreshes expiring credentials inside get_frozen_credentials; asking again
        # every few minutes lets it.
        frozen = self.credentials.get_frozen_credentials()
        soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=5)
        return {"access_key_id": frozen.access_key, "secret_access_key": frozen.secret_key,
                "token": frozen.token, "expires_at": soon}


class S3Storage(Storage):
    """s3://BUCKET/PREFIX. Every object is written whole by one PUT (multipart uploads become
    visible only when complete), so nothing half-written is ever seen under its key."""

    def __init__(self, location: str):
        self.location = location.rstrip("/")
        bucket, _, prefix = self.location[len("s3://"):].partition("/")
        self.bucket, self.prefix = bucket, prefix
        config = _AwsConfig(self.location)
        self.endpoint = config.endpoint or f"https://s3.{config.region}.amazonaws.com"
        self.retries = _retries()
        retry = {"max_retries": self.retries, "retry_timeout": datetime.timedelta(minutes=3),
                 "backoff": {"init_backoff": datetime.timedelta(milliseconds=200),
                             "max_backoff": datetime.timedelta(seconds=10), "base": 2}}
        self.store = S3Store(bucket, prefix=prefix or None, retry_config=retry,
                             **config.store_options())
        self._lock = threading.Lock()
        self.bytes_fetched = 0  # payload bytes of every GET, for the benchmarks and tests
        self.gets = 0

    @property
    def remote(self) -> bool:
        return True

    # -- errors -----------------------------------------------------------------------------
    def _error(self, exc: Exception, op: str, key: str) -> StorageError:
        url = self.url(key)
        if isinstance(exc, (NotFoundError, FileNotFoundError)):
            return ObjectMissing(f"{url}: does not exist")
        if isinstance(exc, (AlreadyExistsError, PreconditionError)):
            return WriteConflict(f"{url}: changed by another process")
        reason = _reason(exc)
        if isinstance(exc, (PermissionDeniedError, UnauthenticatedError)) or any(
            code in reason for code in ("InvalidAccessKeyId", "SignatureDoesNotMatch",
                                        "AccessDenied", "403 Forbidden")):
            return StorageError(
                f"{url}: {op} refused by {self.endpoint}: {reason}; check the AWS credentials "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws/credentials)")
        if "error sending request" in reason or "onnection refused" in reason:
            return StorageError(f"{url}: cannot reach the S3 endpoint {self.endpoint} "
                                f"({self.retries} retries): {reason}")
        if re.match(r"4\d\d ", reason):  # the server's answer, not a fault worth retrying
            return StorageError(f"{url}: {op} refused by {self.endpoint}: {reason}")
        return StorageError(f"{url}: {op} failed after {self.retries} retries: {reason}")

    def _count(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_fetched += nbytes
            self.gets += 1

    # -- reads ------------------------------------------------------------------------------
    def read(self, key: str) -> bytes:
        return self.read_versioned(key)[0]

    def read_versioned(self, key: str) -> tuple[bytes, str]:
        try:
            result = obstore.get(self.store, key)
            data = bytes(result.bytes())
        except Exception as exc:  # obstore raises its own types; _error sorts them
            raise self._error(exc, "GET", key) from None
        self._count(len(data))
        expected = result.meta["size"]
        if len(data) != expected:
            raise StorageError(f"{self.url(key)}: truncated read ({len(data)} of {expected} "
                               "bytes)")
        return data, result.meta["e_tag"]

    def read_range(self, key: str, start: int, length: int) -> bytes:
        try:
            data = bytes(obstore.get_range(self.store, key, start=start, length=length))
        except Exception as exc:
            raise self._error(exc, "ranged GET", key) from None
        self._count(len(data))
        if len(data) != length:  # S3 answers a range past the end with what there is
            raise StorageError(f"{self.url(key)}: truncated (bytes {start}-{start + length} "
                               f"asked, {len(data)} there)")
        return data

    def list(self, prefix: str = "") -> dict[str, int]:
        try:
            return {meta["path"]: meta["size"]
                    for batch in obstore.list(self.store, prefix=prefix.rstrip("/") or None)
                    for meta in batch}
        except Exception as exc:
            raise self._error(exc, "LIST", prefix) from None

    def exists(self, key: str) -> bool:
        try:
            obstore.head(self.store, key)
            return True
        except Exception as exc:
            error = self._error(exc, "HEAD", key)
            if isinstance(error, ObjectMissing):
                return False
            raise error from None

    # -- writes -----------------------------------------------------------------------------
    def write(self, key: str, data: bytes) -> None:
        try:
            obstore.put(self.store, key, data)
        except Exception as exc:
            raise self._error(exc, "PUT", key) from None

    def write_if(self, key: str, data: bytes, expect: str | None) -> str:
        mode = "create" if expect is None else {"e_tag": expect}
        try:
            return obstore.put(self.store, key, data, mode=mode)["e_tag"]
        except Exception as exc:
            error = self._error(exc, "conditional PUT", key)
        if isinstance(error, WriteConflict):
            # A retried PUT whose first try did land answers 412 to its own write: that is ours.
            try:
                current, version = self.read_versioned(key)
            except ObjectMissing:
                raise error from None
            if current == data:
                return version
        raise error

    def delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):  # S3's DeleteObjects takes 1,000 keys a request
            try:
                obstore.delete(self.store, keys[i:i + 1000])
            except Exception as exc:
                raise self._error(exc, "DELETE", keys[i]) from None

    def move(self, src: str, dst: str) -> None:
        # S3 has no rename: a server-side copy (no bytes through this machine), then a delete.
        try:
            obstore.copy(self.store, src, dst)
        except Exception as exc:
            raise self._error(exc, "COPY", src) from None
        self.delete([src])

    def zarr_store(self):
        return zarr.storage.ObjectStore(self.store)


def _reason(exc: Exception) -> str:
    """obstore's message, which spans many lines with a debug dump, as one short line: the HTTP
    status and the server's error code and message when there is one."""
    text = str(exc)
    fields = dict(_XML_FIELD.findall(text))
    status = re.search(r"status code: (\d{3}[A-Za-z ]*)", text)
    if status:
        detail = ": ".join(v for v in (fields.get("Code"), fields.get("Message")) if v)
        return status.group(1).strip() + (f" ({detail})" if detail else "")
    head = " ".join(text.split("Debug source")[0].split())
    head = re.sub(r"Error performing \S+ \S+ in \S+ - ", "", head)
    return head.strip(" :")[:300]
