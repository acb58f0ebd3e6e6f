"""Local copies of a bucket archive's Parquet objects, for readers that need files on disk.

    >>> files = staged(loc, flushes, {"step", "rollout_ended"}, cache_dir(home, loc))
    >>> files["klong.rollouts/<id>/klong.rollouts+0+...+..."]["step"]   # a local Path, verified

A dataset build (consumers.dataset_inputs) reads the archive with DuckDB's `read_parquet(...,
filename=true, file_row_number=true)`: it plans on small columns, then fetches the token arrays of the
steps it keeps by (file, row number). DuckDB reads S3 only through its httpfs extension, whose wheels
do not match the DuckDB this project pins, and a pyarrow dataset registered into DuckDB has no row
numbers. So the objects a build reads are copied once into `HOME/tmp/archive-cache/<url hash>/`, under
their archive-relative keys, and DuckDB reads those: the same code, the same file order (a path's rank
decides which archived copy of an event a build keeps), so the same content hash as on local disk.

Flushes are immutable once committed (a repair re-fetches a flush into a new manifest), so a cached
copy is reused while its size and CRC-32 match what the flush's manifest records; a copy is written
to a temp name and renamed, so concurrent builds share the cache safely. An object that does not match
its manifest after download is an error naming it (`klong archive verify` finds such damage), never a
silently different dataset. The cache can be deleted whenever no build runs; it only costs a download again.
"""

from __future__ import annotations

import hashlib
import os
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from schemas.errors import KlongError
from store.archive import FlushDir, relative
from core.objstore import S3Location

CHUNK = 8 << 20  # bytes per read of an object: bounded memory whatever an object's size
THREADS = 8  # S3 GETs are latency-bound: a few in flight hide the round trips


class ArchiveObjectError(KlongError):
    """An archived object does not match its flush's manifest (damaged or replaced)."""


def cache_dir(home: Path | str, loc: S3Location) -> Path:
    """Where the objects of the archive at `loc` are cached in this data home."""
    return Path(home) / "tmp" / "archive-cache" / hashlib.sha256(loc.url.encode()).hexdigest()[:16]


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _fresh(local: Path, entry: dict | None) -> bool:
    """The cached copy is the object the manifest names (an entry-less flush, damaged, is never trusted)."""
    try:
        return entry is not None and local.stat().st_size == entry["bytes"] and _crc32(local) == entry["crc32"]
    except OSError:
        return False


def _download(loc: S3Location, key: str, local: Path, entry: dict | None) -> None:
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    crc, size = 0, 0
    try:
        with loc.fs.open_input_stream(key) as src, open(tmp, "wb") as dst:
            while chunk := src.read(CHUNK):
                crc, size = zlib.crc32(chunk, crc), size + len(chunk)
                dst.write(chunk)
        if entry is not None and (size, crc) != (entry["bytes"], entry["crc32"]):
            raise ArchiveObjectError(f"archive object {loc.url_of(key)} does not match its flush's manifest "
                                     f"({size} bytes, crc32 {crc} vs {entry['bytes']}, {entry['crc32']}): "
                                     "`klong archive verify` reports it, `klong archive repair` fixes it")
        os.replace(tmp, local)
    except OSError as e:
        raise ArchiveObjectError(f"archive object {loc.url_of(key)}: cannot read it "
                                 f"({str(e).splitlines()[0][:200]})") from e
    finally:
        tmp.unlink(missing_ok=True)


def staged(loc: S3Location, flushes: list[FlushDir], tables: set[str] | frozenset[str],
           cache: Path) -> dict[str, dict[str, Path]]:
    """Archive-relative flush -> {table: local file} for these flushes' files of `tables`, each downloaded
    into `cache` unless a verified copy is there already."""
    out: dict[str, dict[str, Path]] = {}
    todo = []
    for d in flushes:
        rel = relative(loc, d.path)
        files = out.setdefault(rel, {})
        for table, key in sorted(d.files.items()):
            if table not in tables:
                continue
            local = cache.joinpath(*rel.split("/"), f"{table}.parquet")
            entry = (d.manifest or {}).get("files", {}).get(f"{table}.parquet")
            if not _fresh(local, entry):
                todo.append((str(key), local, entry))
            files[table] = local
    if todo:
        with ThreadPoolExecutor(min(THREADS, len(todo)), thread_name_prefix="klong-archive-cache") as pool:
            for f in [pool.submit(_download, loc, *job) for job in todo]:
                f.result()
    return out
