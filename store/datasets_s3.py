"""Dataset versions in the archive's bucket, so that a trainer on another machine finds them.

    s3://bucket/prefix/_datasets/<NAME>/v<N>/tokens.parquet
                                            /samples.parquet
                                            /manifest.json      <- written last: the commit point

With an S3 archive (`KLONG_ARCHIVE_URL=s3://bucket/prefix`) a build publishes its version locally as
always (`HOME/datasets/NAME/v<N>/`), then `push` PUTs its Parquet files and then its manifest (the same
rule as the archive's flushes: a version without a manifest object is not published, so a build killed
mid-upload leaves nothing visible; the next build or `push` of it finishes the upload). Its number is
the next free one over the local and the bucket's versions (`taken`).

A machine whose `HOME/datasets` lacks a version the bucket holds fetches it (`resolve`) into
`HOME/datasets/_cache/NAME/v<N>/`: the three objects are downloaded into a scratch directory, the content
hash is recomputed from the downloaded files and must be the manifest's, and only then is the directory
renamed into the cache. store.datasets finds cached versions beside local ones (a local one wins), so the
trainer's reader, exports, lineage and the SQL views read them unchanged, and the SQL lock-down (the
datasets directory) covers the cache. A cached copy is reused while its manifest's content hash is the
bucket's (one small GET); versions are immutable, so a different hash means another bucket or a rebuilt
one, and the copy is fetched again. A version present locally and in the bucket with different content
hashes is an error naming both; nothing picks one silently. The cache can be deleted at any time when no
reader has it open.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from store import datasets as ds
from store.archive import DATASETS as PREFIX  # under the archive's prefix; "_" keeps it apart from topics
from core.objstore import S3Location

FILES = (ds.TOKENS, ds.SAMPLES)  # uploaded first; ds.MANIFEST last
CHUNK = 8 << 20


def key(loc: S3Location, name: str, version: int, file: str | None = None) -> str:
    return loc.join(PREFIX, ds.check_name(name), f"v{version}", *([file] if file else []))


def url(loc: S3Location, name: str, version: int) -> str:
    return loc.url_of(key(loc, name, version)) + "/"


def remote_versions(loc: S3Location, name: str) -> list[int]:
    """The versions of NAME in the bucket: those whose manifest object is there (published)."""
    out = []
    for info in loc.list(loc.join(PREFIX, ds.check_name(name))):
        parts = info.path.split("/")
        m = ds._VERSION_DIR.fullmatch(parts[-2])
        if parts[-1] == ds.MANIFEST and m and parts[-3] == name:
            out.append(int(m[1]))
    return sorted(out)


def remote_manifest(loc: S3Location, name: str, version: int) -> dict | None:
    """The bucket's manifest of NAME@N; None when the version is not published there."""
    path = key(loc, name, version, ds.MANIFEST)
    try:
        data = loc.read_bytes(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ds.DatasetError(f"{name}@{version}: cannot read {loc.url_of(path)} "
                              f"({str(e).splitlines()[0][:200]})") from e
    try:
        return json.loads(data)
    except ValueError as e:
        raise ds.DatasetError(f"{name}@{version}: manifest {loc.url_of(path)} is not JSON ({e})") from e


def remote_manifests(loc: S3Location) -> list[dict]:
    """Every published version's manifest in the bucket, by name and version."""
    found = []
    for info in loc.list(loc.join(PREFIX)):
        parts = info.path.split("/")
        m = ds._VERSION_DIR.fullmatch(parts[-2])
        if parts[-1] == ds.MANIFEST and m and ds._NAME.fullmatch(parts[-3]):
            found.append((parts[-3], int(m[1])))
    return [m for name, v in sorted(found) if (m := remote_manifest(loc, name, v)) is not None]


def _conflict(home: Path, loc: S3Location, name: str, version: int, local_hash: str, remote_hash: str) -> ds.DatasetError:
    return ds.DatasetError(
        f"{name}@{version} differs between {ds.datasets_dir(home) / name / f'v{version}'} (content hash "
        f"{local_hash}) and {url(loc, name, version)} (content hash {remote_hash}): two builds took the same "
        "version number; keep one (move the other away) before using it")


def push(loc: S3Location, home: Path | str, name: str, version: int) -> bool:
    """Uploads the local NAME@N to the bucket (files, then the manifest); False when the bucket already holds
    it. DatasetError when the bucket holds another NAME@N (a different content hash)."""
    home = Path(home)
    vdir = ds.version_dir(home, name, version)
    manifest = json.loads((vdir / ds.MANIFEST).read_text())
    there = remote_manifest(loc, name, version)
    if there is not None:
        if there.get("content_hash") != manifest["content_hash"]:
            raise _conflict(home, loc, name, version, manifest["content_hash"], there.get("content_hash"))
        return False
    for f in FILES:
        with open(vdir / f, "rb") as src, loc.fs.open_output_stream(key(loc, name, version, f), metadata={}) as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)
    loc.write_bytes(key(loc, name, version, ds.MANIFEST), (vdir / ds.MANIFEST).read_bytes())
    return True


def _download(loc: S3Location, path: str, local: Path) -> None:
    try:
        with loc.fs.open_input_stream(path) as src, open(local, "wb") as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)
    except OSError as e:
        gone = isinstance(e, FileNotFoundError) or "NoSuchKey" in str(e) or "not found" in str(e).lower()
        raise ds.DatasetError(f"dataset object {loc.url_of(path)}: " + (
            "missing from the bucket (its manifest is there: the version is damaged; rebuild it or restore the "
            "object)" if gone else f"cannot read it ({str(e).splitlines()[0][:200]})")) from e


def fetch(loc: S3Location, home: Path | str, name: str, version: int, manifest: dict) -> Path:
    """Downloads NAME@N into the cache, checks its content hash against `manifest` (the bucket's), and renames
    it into place; returns the cached version directory."""
    home = Path(home)
    scratch = ds.datasets_dir(home) / "_tmp" / f"fetch-{uuid.uuid4().hex}"
    scratch.mkdir(parents=True)
    try:
        for f in FILES:
            _download(loc, key(loc, name, version, f), scratch / f)
        (scratch / ds.MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        actual = ds.content_hash(manifest, *ds.stored_digests(scratch))
        if actual != manifest["content_hash"]:
            raise ds.DatasetError(f"{url(loc, name, version)}: its files do not match its manifest's content hash "
                                  f"({actual[:19]}... != {manifest['content_hash'][:19]}...): the version in the "
                                  "bucket is damaged; rebuild it")
        final = ds.cache_dir(home) / name / f"v{version}"
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # a stale copy (another bucket's NAME@N): moved aside, then removed
            old = final.with_name(f".{final.name}-old-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(final, old)
            except FileNotFoundError:
                pass
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(scratch, final)
        except OSError:  # a concurrent reader (another rank) cached it first: theirs is the same verified version
            if not (final / ds.MANIFEST).is_file():
                raise
        return final
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _local_manifest(home: Path, name: str, version: int, where: Path) -> dict | None:
    path = where / name / f"v{version}" / ds.MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ds.DatasetError(f"{name}@{version}: manifest {path} is unreadable: {e}") from e


def resolve(home: Path | str, loc: S3Location, ref: str) -> str:
    """Makes the version `ref` ("NAME@N", or "NAME" for its latest here or in the bucket) readable from this
    home: a local version is checked against the bucket's, one only in the bucket is fetched into the cache.
    Returns the ref as given (store.datasets then resolves it; it reports a version that exists nowhere)."""
    home = Path(home)
    name, _, ver = ref.partition("@")
    ds.check_name(name)
    remote = remote_versions(loc, name)
    if ver and not ver.isdigit():
        return ref
    local = ds.versions(home, name, cached=False)
    version = int(ver) if ver else max(local + remote, default=None)
    if version is None or version not in remote:
        return ref
    there = remote_manifest(loc, name, version)
    if there is None:  # deleted since the listing
        return ref
    mine = _local_manifest(home, name, version, ds.datasets_dir(home))
    if mine is not None:
        if mine.get("content_hash") != there.get("content_hash"):
            raise _conflict(home, loc, name, version, mine.get("content_hash"), there.get("content_hash"))
        return ref
    cached = _local_manifest(home, name, version, ds.cache_dir(home))
    if cached is None or cached.get("content_hash") != there.get("content_hash") \
            or not all((ds.cache_dir(home) / name / f"v{version}" / f).is_file() for f in FILES):
        fetch(loc, home, name, version, there)
    return ref


def listing(home: Path | str, loc: S3Location) -> list[dict]:
    """The manifests of every version here or in the bucket (`klong dataset list`), without fetching any;
    DatasetError for a version whose local and bucket copies differ."""
    home = Path(home)
    mine = {m["ref"]: m for m in ds.all_manifests(home, cached=False)}
    out = dict(mine)
    for m in remote_manifests(loc):
        have = mine.get(m.get("ref"))
        if have is not None and have["content_hash"] != m.get("content_hash"):
            raise _conflict(home, loc, m["name"], m["version"], have["content_hash"], m.get("content_hash"))
        out.setdefault(m["ref"], m)
    return sorted(out.values(), key=lambda m: (m["name"], m["version"]))
