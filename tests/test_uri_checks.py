"""Which URIs a tenant may name: the checks the API applies before anything is read or written."""

from __future__ import annotations

import pytest

from app.api.problems import ApiProblem
from app.api.routes.merges import check_input_uri
from app.core.config import Settings


def _settings(**kw) -> Settings:
    return Settings(storage_url="s3://service/artifacts", file_roots=["/data/models"], **kw)


@pytest.mark.parametrize("uri", [
    "s3://any-bucket/models/bert", "file:///data/models/bert", "s3://service/artifacts/tenant-a/x",
    "s3://service/artifacts/tenant-a", "file:///data/models/bert/",
])
def test_allowed(uri):
    assert check_input_uri(_settings(), "tenant-a", uri, "f") == uri


@pytest.mark.parametrize(("uri", "words"), [
    ("S3://any-bucket/x", "only s3:// and file://"),
    ("http://host/x", "only s3:// and file://"),
    ("file://host/data/models/x", "without a host"),
    ("file:///etc/passwd", "outside the folders"),
    ("file:///data/models/../../etc", "'..'"),
    ("s3://service//artifacts/tenant-b/x", "empty"),
    ("s3://service/artifacts/tenant-b/x", "tenant names only"),
    ("s3://service/artifacts", "tenant names only"),
    ("s3://bucket/x?versionId=1", "no query"),
    ("s3:///x", "names a bucket"),
])
def test_refused(uri, words):
    with pytest.raises(ApiProblem) as raised:
        check_input_uri(_settings(), "tenant-a", uri, "models.0.model")
    assert raised.value.status == 422 and words in raised.value.detail
    assert raised.value.detail.startswith("models.0.model: ")


def test_bucket_allow_list():
    settings = _settings(s3_buckets=["models"])
    assert check_input_uri(settings, "t", "s3://models/bert", "f")
    assert check_input_uri(settings, "t", "s3://service/artifacts/t/x", "f")  # the storage bucket is always allowed
    with pytest.raises(ApiProblem, match="not one this service may use"):
        check_input_uri(settings, "t", "s3://someone-else/secret", "f")
