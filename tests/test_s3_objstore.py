"""core.objstore without a server: archive URLs are checked, S3 settings come from the AWS variables,
and no secret is ever printed."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from core.settings import Settings
from schemas.errors import ConfigError
from core.objstore import S3Location, is_s3, location, s3_filesystem


def test_location_parses_s3_urls_and_keeps_local_paths():
    loc = location("s3://my-bucket/a/b/")
    assert is_s3(loc) and (loc.bucket, loc.prefix, loc.root) == ("my-bucket", "a/b", "my-bucket/a/b")
    assert loc.join("t", "id", "x.parquet") == "my-bucket/a/b/t/id/x.parquet"
    assert location("s3://my-bucket").root == "my-bucket"
    assert location("/data/archive") == Path("/data/archive") and not is_s3(location("/data/archive"))
    for bad in ["s3://", "s3://Upper/x", "s3://b/../etc", "s3://bucket/a//b", "gs://bucket/x", "s3://bucket/a b"]:
        with pytest.raises(ConfigError):
            location(bad)
    with pytest.raises(ValueError):
        loc.join("..")  # a path component never climbs out of the prefix


def test_settings_take_the_archive_url_from_the_environment_and_never_print_secrets(monkeypatch, tmp_path):
    monkeypatch.setenv("KLONG_ARCHIVE_URL", "s3://bucket/prefix")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    s = Settings.load(tmp_path)
    assert isinstance(s.archive, S3Location) and s.archive.url == "s3://bucket/prefix"
    assert "very-secret-value" not in repr(s) + str(s.describe()) + repr(s.archive) + str(s.archive)
    assert s.describe()["archive"] == "s3://bucket/prefix"
    fs = s3_filesystem()
    assert fs.region == "us-east-1"
    assert "very-secret-value" not in repr(fs)
    # a writer process gets the URL, never a live client (and so no credentials in the pickle)
    assert b"very-secret-value" not in pickle.dumps(s.archive)
    assert pickle.loads(pickle.dumps(s.archive)) == s.archive
    monkeypatch.delenv("KLONG_ARCHIVE_URL")
    assert Settings.load(tmp_path).archive == tmp_path.resolve() / "archive"  # the default: a local directory
