"""The archive's layout in an S3 bucket: the same keys as on disk, committed by the manifest object.

    s3://bucket/prefix/<topic>/<topic_id>/<topic>+<partition>+<first>+<last>/<event_type>.parquet
                                                                              /manifest.json

S3 has no rename, so `write_flush_s3` writes the flush's Parquet objects first and its `manifest.json`
last: the manifest is the commit point. A flush "directory" without a manifest is not archived: readers
and recovery ignore it (verify lists it as a stray), and the sink deletes those of the partitions it
resumes (`drop_unfinished`), whose writer is gone. A PUT is atomic, so a reader never sees half an object.

Writers of one machine serialize against a resuming sink with a local lock file (`lock_file`), as on
disk; sinks on different machines own different partitions (the consumer group).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections import defaultdict
from collections.abc import Container
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq

from store.archive_layout import (_NAME, DATASETS, LOW_CARDINALITY, MANIFEST, QUARANTINE, TMP, TABLES, FlushDir, Stray,
                                  file_entry, flush_name, make_manifest, parse_manifest)
from core.objstore import S3Location

_manifests: dict[tuple, dict] = {}  # (path, size, mtime) -> parsed manifest


def lock_file(loc: S3Location) -> Path:
    """The local lock file that stands for the archive's writer lock on this machine."""
    return Path(tempfile.gettempdir()) / f"klong-s3-{hashlib.sha256(loc.url.encode()).hexdigest()[:16]}.lock"


def _group(loc: S3Location, topic: str | None) -> tuple[dict[str, dict[str, object]], list[Stray]]:
    """flush path -> {file name: FileInfo} of every object in the flush layout; the rest are strays."""
    dirs: dict[str, dict[str, object]] = defaultdict(dict)
    strays: list[Stray] = []
    base = loc.root + "/" + (f"{topic}/" if topic else "")
    for info in loc.list(base.rstrip("/")):
        rel = info.path[len(loc.root) + 1:].split("/")
        if rel[0] in (TMP, QUARANTINE, DATASETS) or (topic and rel[0] != topic):
            continue
        if len(rel) != 4:
            strays.append(Stray(PurePosixPath(info.path), "not in the archive layout (<topic>/<id>/<flush>/<file>)"))
            continue
        m = _NAME.fullmatch(rel[2])
        if not m or m["topic"] != rel[0]:
            strays.append(Stray(PurePosixPath(info.path),
                                "not in a flush directory (<topic>+<partition>+<first>+<last>)"))
            continue
        dirs["/".join(info.path.split("/")[:-1])][rel[3]] = info
    return dirs, strays


def _manifest(loc: S3Location, path: str, info) -> dict:
    key = (path, info.size, info.mtime_ns)  # a rewritten manifest is read again
    if key not in _manifests:
        _manifests[key] = parse_manifest(lambda: loc.read_bytes(f"{path}/{MANIFEST}"))
    return _manifests[key]


def walk_s3(loc: S3Location, topic: str | None = None, skip: Container[str] = frozenset()
            ) -> tuple[list[FlushDir], list[Stray]]:
    """Every committed flush (one with a manifest) and every stray object, in path order; the flushes whose
    path is in `skip` are left out without reading their manifests."""
    from store.archive import _warn

    dirs, strays = _group(loc, topic)
    flushes = []
    for path, objects in sorted(dirs.items()):
        parts = path.split("/")
        m = _NAME.fullmatch(parts[-1])
        if MANIFEST not in objects:
            strays.append(Stray(PurePosixPath(path), "an unfinished flush (no manifest.json): not archived"))
            continue
        if skip and path in skip:
            continue
        manifest, error = None, None
        try:
            manifest = _manifest(loc, path, objects[MANIFEST])
        except (ValueError, OSError) as e:
            error = str(e)
            _warn(PurePosixPath(path), error)
        files = {}
        for name in sorted(objects):
            if name == MANIFEST:
                continue
            if manifest is not None and name in manifest["files"] or manifest is None and name[:-8] in TABLES \
                    and name.endswith(".parquet"):
                files[name[:-8]] = PurePosixPath(f"{path}/{name}")
            else:
                strays.append(Stray(PurePosixPath(f"{path}/{name}"), "not listed in the flush's manifest"))
        flushes.append(FlushDir(m["topic"], parts[-2], int(m["partition"]), int(m["start"]), int(m["end"]),
                                PurePosixPath(path), manifest, files, error, store=loc))
    return flushes, strays


def recover_positions_s3(loc: S3Location, topic: str, topic_id: str) -> dict[int, int]:
    """Next offset per partition: 1 + the highest last offset of a committed flush (one with a manifest)."""
    pos: dict[int, int] = {}
    for info in loc.list(loc.join(topic, topic_id)):
        parts = info.path.split("/")
        m = _NAME.fullmatch(parts[-2])
        if parts[-1] == MANIFEST and m:
            p = int(m["partition"])
            pos[p] = max(pos.get(p, 0), int(m["end"]) + 1)
    return pos


def drop_unfinished(loc: S3Location, topic: str, topic_id: str, partitions: set[int]) -> int:
    """Deletes the objects of unfinished flushes (no manifest) of these partitions; call it holding the
    writer lock exclusively, when no writer of them is alive. Returns how many flushes it dropped."""
    by_dir: dict[str, list[str]] = defaultdict(list)
    for info in loc.list(loc.join(topic, topic_id)):
        parts = info.path.split("/")
        m = _NAME.fullmatch(parts[-2])
        if m and int(m["partition"]) in partitions:
            by_dir["/".join(parts[:-1])].append(parts[-1])
    dropped = 0
    for d, names in by_dir.items():
        if MANIFEST not in names:
            for n in names:
                loc.delete(f"{d}/{n}")
            dropped += 1
    return dropped


def write_flush_s3(loc: S3Location, topic: str, topic_id: str, partition: int, start: int, end: int,
                   tables: dict[str, pa.Table], compression: str = "zstd", *, after: int | None = None,
                   through: int | None = None, records: int | None = None) -> PurePosixPath:
    """One flush: its Parquet objects, then its manifest (the commit point). Idempotent: a committed range
    is left as it is; the objects of an unfinished earlier try are overwritten."""
    final = loc.join(topic, topic_id, flush_name(topic, partition, start, end))
    if loc.exists(f"{final}/{MANIFEST}"):
        return PurePosixPath(final)
    files = {}
    for name, table in tables.items():
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression=compression,
                       use_dictionary=[c for c in table.column_names if c in LOW_CARDINALITY])
        data = sink.getvalue().to_pybytes()
        loc.write_bytes(f"{final}/{name}.parquet", data)
        files[f"{name}.parquet"] = file_entry(table.num_rows, data)
    manifest = make_manifest(topic, topic_id, partition, start, end, tables, files, after, through, records)
    loc.write_bytes(f"{final}/{MANIFEST}", json.dumps(manifest, indent=1, sort_keys=True).encode())
    return PurePosixPath(final)
