"""`S3Storage`: objects in an S3 bucket (AWS, MinIO, SeaweedFS via `endpoint_url`) under a key prefix.

An S3 PUT is atomic per object, so a reader sees the old object or the new one. The bucket is
created on demand at the first write. Every request rides through an outage of the endpoint
(`infra.outage`): it waits, within the outage budget, and is sent again (each is idempotent: a
PUT, GET, HEAD, LIST or DELETE). `check_reachable` fails fast instead: a TCP connect to the
endpoint, then one HEAD of the bucket.
"""

from __future__ import annotations

import functools
import os
import re
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from infra.errors import InfraError, StorageKeyError, StorageUnreachableError, redact_url
from infra.outage import configured_budget_s, ride_through
from infra.storage.protocol import validate_key, validate_prefix

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
else:
    S3Client = Any

T = TypeVar("T")

_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NoSuchBucket", "NotFound"})
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_DELETE_BATCH = 1000


def make_s3_client(
    endpoint_url: str | None = None,
    region: str | None = None,
    *,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    connect_timeout: float = 5.0,
    read_timeout: float = 60.0,
    max_attempts: int = 5,
) -> S3Client:
    """Build a boto3 S3 client; credentials come from boto3's usual chain unless given.

    Args:
        endpoint_url: e.g. ``http://127.0.0.1:8333`` for SeaweedFS/MinIO; None for AWS.
        region: signing region; defaults to AWS_REGION / AWS_DEFAULT_REGION, else ``us-east-1``
            when an endpoint is given.
        access_key_id: explicit key id (default: AWS_ACCESS_KEY_ID, profiles, roles ...).
        secret_access_key: explicit secret, used with `access_key_id`.
        connect_timeout: seconds to wait for a TCP connection.
        read_timeout: seconds to wait for a response.
        max_attempts: total attempts per request, retries included ("standard" retry mode).

    Returns:
        A botocore S3 client using path-style addressing when `endpoint_url` is set.
    """
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if endpoint_url and not region:
        region = "us-east-1"
    config = Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"total_max_attempts": max_attempts, "mode": "standard"},
        s3={"addressing_style": "path"} if endpoint_url else None,
    )
    session = boto3.session.Session()
    return session.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        config=config,
    )


class S3Storage:
    """Objects in an S3 bucket under an optional key prefix; the bucket is created on demand.

    Args:
        bucket: bucket name (3-63 lowercase letters, digits, '.', '-').
        prefix: key prefix inside the bucket, e.g. ``"team/fedprune"``; '' for the bucket root.
        endpoint_url: S3 endpoint for non-AWS stores, e.g. ``http://127.0.0.1:8333``.
        region: signing region (see `make_s3_client`).
        client: a ready boto3 S3 client (tests, custom credentials); built when None.
        outage_budget_s: how long a request waits for an unreachable endpoint; None reads
            FEDPRUNE_OUTAGE_BUDGET_S (default 300 s).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        client: S3Client | None = None,
        outage_budget_s: float | None = None,
    ) -> None:
        if not _BUCKET_RE.match(bucket):
            raise ValueError(
                f"S3 bucket {bucket!r} is not a valid name: use 3-63 lowercase letters, digits, '.' or '-', "
                "starting and ending with a letter or digit, e.g. 'fedprune'"
            )
        self.bucket = bucket
        self.prefix = validate_prefix(prefix.strip("/")).strip("/")
        self.endpoint_url = endpoint_url
        self.client: S3Client = client if client is not None else make_s3_client(endpoint_url, region)
        self.outage_budget_s = configured_budget_s() if outage_budget_s is None else outage_budget_s

    @property
    def url(self) -> str:
        """``s3://bucket/prefix`` URL of the stored objects."""
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def __repr__(self) -> str:
        endpoint = f", endpoint_url={redact_url(self.endpoint_url)!r}" if self.endpoint_url else ""
        return f"S3Storage({self.url!r}{endpoint})"

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _ride(self, call: Callable[[], T]) -> T:
        return ride_through(f"storage {self.url}", call, self.outage_budget_s, "s3")

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (a concurrent creation is not an error)."""
        self._ride(self._ensure_bucket)

    def check_reachable(self, create_bucket: bool = False, timeout_s: float = 2.0) -> None:
        """Fail fast if the endpoint or the bucket cannot be used: a TCP connect, then one HEAD of the bucket.

        Not ridden through an outage: it is the check that says, at once, that there is one.

        Args:
            create_bucket: create a missing bucket instead of failing.
            timeout_s: TCP connect timeout in seconds.

        Raises:
            StorageUnreachableError: naming the endpoint (credentials redacted), the rule, and the fix.
        """
        endpoint = redact_url(self.client.meta.endpoint_url)
        _check_tcp(endpoint, self.client.meta.endpoint_url, timeout_s)
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except NoCredentialsError:
            raise StorageUnreachableError(
                f"no S3 credentials found for {endpoint}: S3 storage needs credentials; export "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or configure an AWS profile)"
            ) from None
        except ClientError as error:
            _raise_for_bucket(self, endpoint, error, create_bucket)
        except BotoCoreError as error:
            raise StorageUnreachableError(
                f"S3 endpoint {endpoint} did not answer ({type(error).__name__}): storage needs a reachable S3 "
                "endpoint; start the local stack or set FEDPRUNE_S3_ENDPOINT_URL to a running one"
            ) from None

    def _ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as error:
            if not _is_not_found(error):
                raise
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        region = self.client.meta.region_name
        if self.endpoint_url is None and region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self.client.create_bucket(**kwargs)
        except ClientError as error:
            if error.response["Error"].get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def put_bytes(self, key: str, data: bytes) -> None:
        """PUT the object (atomic in S3); creates the bucket and retries once if it is missing."""
        full = self._full(validate_key(key))
        self._ride(lambda: self._put(full, data))

    def _put(self, full: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=full, Body=data)
        except ClientError as error:
            if error.response["Error"].get("Code") != "NoSuchBucket":
                raise
            self._ensure_bucket()
            self.client.put_object(Bucket=self.bucket, Key=full, Body=data)

    def get_bytes(self, key: str) -> bytes:
        """GET the object; raise `StorageKeyError` if the key (or the bucket) does not exist."""
        full = self._full(validate_key(key))
        return self._ride(lambda: self._get(key, full))

    def _get(self, key: str, full: str) -> bytes:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=full)
        except ClientError as error:
            if _is_not_found(error):
                raise StorageKeyError(key, self.url) from None
            raise
        body: bytes = response["Body"].read()  # inside the ride: the connection can drop mid-body
        return body

    def exists(self, key: str) -> bool:
        """HEAD the object."""
        full = self._full(validate_key(key))
        return self._ride(lambda: self._exists(full))

    def _exists(self, full: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=full)
        except ClientError as error:
            if _is_not_found(error):
                return False
            raise
        return True

    def list_keys(self, prefix: str) -> list[str]:
        """List keys under `prefix` (all pages), relative to this storage's prefix, sorted."""
        full = self._full(validate_prefix(prefix)) if prefix else (f"{self.prefix}/" if self.prefix else "")
        return self._ride(lambda: self._list(full))

    def _list(self, full: str) -> list[str]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full
            ):
                keys.extend(item["Key"][strip:] for item in page.get("Contents", []))
        except ClientError as error:
            if _is_not_found(error):
                return []
            raise
        return sorted(keys)

    def delete(self, key: str) -> None:
        """DELETE the object (S3 treats a missing key as success)."""
        full = self._full(validate_key(key))
        self._ride(lambda: self._delete(full))

    def _delete(self, full: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=full)
        except ClientError as error:
            if not _is_not_found(error):
                raise

    def delete_prefix(self, prefix: str) -> None:
        """Delete all objects under `prefix` with batched DeleteObjects calls (1000 per call)."""
        keys = [self._full(key) for key in self.list_keys(prefix)]
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = [{"Key": key} for key in keys[start : start + _DELETE_BATCH]]
            response = self._ride(functools.partial(self._delete_batch, batch))
            if response.get("Errors"):
                first = response["Errors"][0]
                raise InfraError(
                    f"S3 refused to delete {len(response['Errors'])} objects under {self.url}/{prefix} "
                    f"(first: {first.get('Key')!r}, {first.get('Code')}): check the credentials' "
                    "s3:DeleteObject permission and retry"
                )

    def _delete_batch(self, batch: list[dict[str, str]]) -> Any:
        return self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})


def open_s3_url(url: str, endpoint_url: str | None = None) -> S3Storage:
    """`S3Storage` of an ``s3://bucket/optional/prefix`` URL, at `endpoint_url` (None for AWS).

    Raises:
        ValueError: the URL has no bucket, or an invalid one.
    """
    parts = urlsplit(url)
    if not parts.netloc:
        raise ValueError(f"storage url {url!r} has no bucket: use s3://<bucket>/<optional prefix>")
    return S3Storage(parts.netloc, parts.path.strip("/"), endpoint_url=endpoint_url)


def _is_not_found(error: ClientError) -> bool:
    return str(error.response.get("Error", {}).get("Code", "")) in _NOT_FOUND_CODES


def _check_tcp(endpoint: str, raw_endpoint: str, timeout_s: float) -> None:
    parts = urlsplit(raw_endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=timeout_s).close()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise StorageUnreachableError(
            f"S3 endpoint {endpoint} is unreachable ({reason}): storage needs a reachable S3 endpoint; "
            "start the local stack (`fedprune stack up`) or set FEDPRUNE_S3_ENDPOINT_URL to a running one"
        ) from None


def _raise_for_bucket(storage: S3Storage, endpoint: str, error: ClientError, create_bucket: bool) -> None:
    code = str(error.response.get("Error", {}).get("Code", ""))
    if code in _NOT_FOUND_CODES and create_bucket:
        storage.ensure_bucket()
        return
    if code in _NOT_FOUND_CODES:
        raise StorageUnreachableError(
            f"S3 bucket {storage.bucket!r} does not exist at {endpoint}: storage needs an existing bucket; "
            "create it (check_reachable(storage, create_bucket=True)) or fix FEDPRUNE_STORAGE_URL"
        ) from None
    if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        raise StorageUnreachableError(
            f"S3 endpoint {endpoint} rejected the credentials for bucket {storage.bucket!r} ({code}): "
            "export the right AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for this endpoint"
        ) from None
    raise StorageUnreachableError(
        f"S3 endpoint {endpoint} answered {code} for bucket {storage.bucket!r}: check the endpoint URL, "
        "bucket name and credentials"
    ) from None
