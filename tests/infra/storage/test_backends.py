"""`open_storage`: the backend by URL scheme, and clear errors for URLs it cannot open."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.storage import SCHEMES, LocalStorage, S3Storage, open_storage


def test_open_storage_understands_file_urls_paths_and_s3(tmp_path: Path) -> None:
    by_url = open_storage(tmp_path.as_uri())
    by_path = open_storage(str(tmp_path))
    assert isinstance(by_url, LocalStorage) and by_url.root == tmp_path.resolve()
    assert isinstance(by_path, LocalStorage) and by_path.url == tmp_path.resolve().as_uri()
    s3 = open_storage("s3://my-bucket/team/runs/", endpoint_url="http://127.0.0.1:1")
    assert isinstance(s3, S3Storage) and (s3.bucket, s3.prefix) == ("my-bucket", "team/runs")
    assert s3.url == "s3://my-bucket/team/runs"


@pytest.mark.parametrize(
    ("url", "rule"),
    [("gs://b/p", "unsupported scheme"), ("s3:///p", "no bucket"), ("s3://B_ad/p", "valid name")],
)
def test_open_storage_rejects_bad_urls(url: str, rule: str) -> None:
    with pytest.raises(ValueError, match=rule):
        open_storage(url)


def test_an_unsupported_scheme_is_answered_with_every_scheme_of_the_table() -> None:
    with pytest.raises(ValueError, match="unsupported scheme 'gs'") as info:
        open_storage("gs://b/p")
    assert str(info.value).endswith(
        "use file:///abs/path, a plain directory path, or s3://bucket/prefix"
    )
    assert all(scheme.example in str(info.value) for scheme in SCHEMES.values())
