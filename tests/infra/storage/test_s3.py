"""`S3Storage` on a real SeaweedFS: paging past 1000 keys, buckets on demand, and fast, clear
reachability errors that never show credentials."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from infra.errors import StorageKeyError, StorageUnreachableError
from infra.storage import S3Storage, check_reachable, make_s3_client
from tests.servers import S3Server, free_port


@pytest.mark.integration
def test_s3_listing_and_prefix_delete_page_past_1000_keys(seaweed_s3: S3Server) -> None:
    store = seaweed_s3.storage(prefix="paging")
    keys = [f"k/{i:05d}" for i in range(1005)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda key: store.put_bytes(key, b""), keys))
    assert store.list_keys("k/") == keys  # two ListObjectsV2 pages
    store.delete_prefix("k/")  # two DeleteObjects batches
    assert store.list_keys("") == []


def test_check_reachable_fails_fast_on_a_dead_endpoint() -> None:
    secret = "do-not-print-me-123"
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    client = make_s3_client(endpoint, access_key_id="k", secret_access_key=secret)
    start = time.monotonic()
    with pytest.raises(StorageUnreachableError) as info:
        check_reachable(S3Storage("fedprune", client=client, endpoint_url=endpoint))
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert endpoint in message and "unreachable" in message and "FEDPRUNE_S3_ENDPOINT_URL" in message
    assert secret not in message


@pytest.mark.integration
def test_s3_bucket_is_created_on_demand(seaweed_s3: S3Server) -> None:
    store = S3Storage("on-demand-bucket", endpoint_url=seaweed_s3.endpoint_url, client=seaweed_s3.client)
    assert store.list_keys("") == [] and not store.exists("x")
    with pytest.raises(StorageKeyError):
        store.get_bytes("x")
    store.put_bytes("x", b"1")
    assert store.get_bytes("x") == b"1"


@pytest.mark.integration
def test_check_reachable_names_a_missing_bucket_and_can_create_it(seaweed_s3: S3Server) -> None:
    store = S3Storage("not-yet-there", endpoint_url=seaweed_s3.endpoint_url, client=seaweed_s3.client)
    with pytest.raises(StorageUnreachableError, match="'not-yet-there' does not exist"):
        check_reachable(store)
    check_reachable(store, create_bucket=True)
    check_reachable(store)


@pytest.mark.integration
def test_check_reachable_reports_rejected_credentials_without_the_secret(seaweed_s3: S3Server) -> None:
    wrong = "wrong-secret-value-42"
    client = make_s3_client(
        seaweed_s3.endpoint_url, access_key_id=seaweed_s3.access_key_id, secret_access_key=wrong
    )
    store = S3Storage(seaweed_s3.bucket, endpoint_url=seaweed_s3.endpoint_url, client=client)
    with pytest.raises(StorageUnreachableError, match="rejected the credentials") as info:
        check_reachable(store)
    assert wrong not in str(info.value) and seaweed_s3.secret_access_key not in str(info.value)
