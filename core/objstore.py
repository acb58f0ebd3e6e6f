"""Where the archive lives: a local directory (the default) or a prefix in an S3 bucket.

    KLONG_ARCHIVE_URL=s3://bucket/prefix klong sink run
    >>> loc = location("s3://bucket/prefix")       # S3Location; a local path gives a pathlib.Path
    >>> loc.write_bytes(loc.join("a", "b.parquet"), data); loc.list(loc.root)

An `S3Location` offers the few operations the archive needs (write, read, list, delete, exists) through
pyarrow's S3FileSystem; paths are pyarrow's `bucket/key` strings, always under `root` (`bucket/prefix`).
The endpoint, region and credentials come from the usual AWS variables: `AWS_ENDPOINT_URL_S3` or
`AWS_ENDPOINT_URL` (an `http://` endpoint turns TLS off), `AWS_REGION` (or `AWS_DEFAULT_REGION`),
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`. Secrets are never printed: the
location's repr and str are its URL.

S3 has no rename, so a flush there is committed by its manifest: the files are written first, the
manifest last (store.archive); a reader sees only flushes whose manifest is there.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs

from schemas.errors import ConfigError

_URL = re.compile(r"s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(?P<prefix>[A-Za-z0-9._/+=-]*))?")


def s3_filesystem() -> pafs.S3FileSystem:
    """pyarrow's S3 client configured from the AWS environment variables (see the module docstring)."""
    kw: dict = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, _, host = endpoint.rpartition("://")
        kw["endpoint_override"] = host.rstrip("/")
        kw["scheme"] = scheme or "https"
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kw["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kw["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        if os.environ.get("AWS_SESSION_TOKEN"):
            kw["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return pafs.S3FileSystem(**kw)


@dataclass(frozen=True)
class S3Location:
    """An archive under `s3://bucket/prefix`; `fs` is created on first use (it is not picklable to a writer
    process as a live client, so each process makes its own)."""
    url: str
    bucket: str
    prefix: str  # without slashes at either end; may be empty
    _fs: list = field(default_factory=list, compare=False, hash=False, repr=False)

    def __repr__(self) -> str:
        return f"S3Location({self.url!r})"

    def __str__(self) -> str:
        return self.url

    def __reduce__(self):  # a writer process gets the URL and makes its own client
        return (location, (self.url,))

    @property
    def fs(self) -> pafs.S3FileSystem:
        if not self._fs:
            self._fs.append(s3_filesystem())
        return self._fs[0]

    @property
    def root(self) -> str:
        return f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket

    def join(self, *parts: str) -> str:
        for p in parts:
            if not p or "/" in p or p in (".", ".."):
                raise ValueError(f"bad archive path component {p!r}")
        return "/".join([self.root, *parts])

    def within(self, path: str) -> bool:
        return path == self.root or path.startswith(self.root + "/")

    def url_of(self, path: str) -> str:
        return f"s3://{path}"

    def write_bytes(self, path: str, data: bytes) -> None:
        with self.fs.open_output_stream(path, metadata={}) as f:
            f.write(data)

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type == pafs.FileType.File

    def list(self, path: str | None = None) -> list[pafs.FileInfo]:
        """Every object under `path` (default: the root), recursively, sorted by path; none when absent."""
        sel = pafs.FileSelector(path or self.root, recursive=True, allow_not_found=True)
        try:
            infos = self.fs.get_file_info(sel)
        except OSError as e:  # wrong endpoint or credentials, no such bucket: one line naming the archive
            raise ConfigError(f"archive {self.url}: cannot list it ({str(e).splitlines()[0][:200]})") from e
        return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)

    def delete(self, path: str) -> None:
        self.fs.delete_file(path)

    def check(self) -> None:
        """ConfigError naming the URL when the bucket cannot be reached (wrong endpoint, credentials, bucket)."""
        try:
            info = self.fs.get_file_info(self.bucket)
        except OSError as e:
            raise ConfigError(f"archive {self.url}: cannot reach the bucket ({str(e).splitlines()[0][:200]})") from e
        if info.type == pafs.FileType.NotFound:
            raise ConfigError(f"archive {self.url}: no bucket {self.bucket!r} at the S3 endpoint")


def location(url: str | os.PathLike) -> Path | S3Location:
    """The archive at `url`: `s3://bucket/prefix` gives an S3Location, anything else a local Path."""
    text = str(url)
    if not text.startswith("s3://"):
        if "://" in text:
            raise ConfigError(f"archive URL {text!r}: only s3://bucket/prefix or a local directory")
        return Path(text)
    m = _URL.fullmatch(text.rstrip("/"))
    prefix = (m["prefix"] or "").strip("/") if m else ""
    if not m or "//" in prefix or any(p in (".", "..") for p in prefix.split("/") if prefix):
        raise ConfigError(f"archive URL {text!r} is not s3://bucket/prefix (bucket: 3-63 of a-z 0-9 . -)")
    return S3Location(text.rstrip("/"), m["bucket"], prefix)


def is_s3(archive) -> bool:
    return isinstance(archive, S3Location)
