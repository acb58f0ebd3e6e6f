"""The event archive: Parquet files named by the Kafka offsets they hold (the Kafka Connect HDFS pattern).

Layout under the data home:

    archive/<topic>/<topic_id>/<topic>+<partition>+<first offset>+<last offset>/<event_type>.parquet
                                                                               /dead_letters.parquet
                                                                               /manifest.json

One directory per flush of one partition, written under `archive/_tmp/`, fsync'd and renamed into
place: a flush is in the archive whole or not at all. Its `manifest.json` is the commit record: the
files of the flush with their row counts, sizes and CRC-32, how many Kafka records it holds, and the
offset it follows (`after`: the last offset the sink had read before this flush; null when the sink read
the partition from its beginning), so a lost file or a lost flush shows as a broken chain
(store.integrity). `klong archive repair` moves a damaged flush to `archive/_quarantine/`. The archive,
not Kafka's committed offset, is the truth: at start the sink resumes each partition after the highest
last offset in the names. `topic_id` is the topic's incarnation (a memory broker that restarts recreates
its topics with new ids and offsets from 0 again), so offsets of different incarnations never collide.

Readers see only what the layout and the manifests name: anything else (a stray file, a symlink, a
Parquet file a manifest does not list) is skipped with one warning per path and never followed, so a
`README.txt` or a symlink to /etc dropped into the archive cannot fail or redirect a query. Flushes
written before manifests existed are read by their `<event_type>.parquet` files.

The archive can also be an S3 prefix (`KLONG_ARCHIVE_URL`, core.objstore): the same keys, and the
manifest object, written last, is the commit point there (store.archive_s3); these functions dispatch.
This module reads the layout (walk, list_flushes, archived_files, recover_positions); the names, FlushDir and
the manifest format are store.archive_layout, writing is store.archive_write (write_flush, writer_lock,
clean_tmp), and this module re-exports them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Container
from pathlib import Path

from core.objstore import S3Location, is_s3
from store.archive_layout import (_NAME, DATASETS, DEAD_LETTER_SCHEMA, DEAD_LETTERS, LOCK, LOW_CARDINALITY, MANIFEST,
                                  QUARANTINE, TABLES, TMP, FlushDir, Stray, file_entry, flush_name, make_manifest,
                                  parse_manifest, read_manifest)
from store.archive_write import clean_tmp, write_flush, writer_lock

log = logging.getLogger("klong.archive")
__all__ = ["DATASETS", "DEAD_LETTERS", "DEAD_LETTER_SCHEMA", "LOCK", "LOW_CARDINALITY", "MANIFEST", "QUARANTINE",
           "TABLES", "TMP", "FlushDir", "Stray", "_NAME", "_warn", "archived_files", "clean_tmp", "file_entry",
           "flush_name", "list_flushes", "make_manifest", "parse_manifest", "read_manifest", "recover_positions",
           "relative", "walk", "write_flush", "writer_lock"]

_warned: set[tuple[str, str]] = set()


def _warn(path: Path, why: str) -> None:
    if (str(path), why) not in _warned:  # readers run often (a viewer polls): once per process is enough
        _warned.add((str(path), why))
        log.warning("archive: ignoring %s: %s (`klong archive verify` lists what is out of place)", path, why)


def _entries(path: Path) -> list[os.DirEntry]:
    with os.scandir(path) as it:
        return sorted(it, key=lambda e: e.name)


def _dirs(path: Path, strays: list[Stray], allowed_files: tuple[str, ...] = ()) -> list[os.DirEntry]:
    """The real sub-directories of `path`, sorted; every other entry (file, symlink) is a stray."""
    out = []
    try:
        entries = _entries(path)
    except OSError as e:
        strays.append(Stray(path, f"cannot be listed ({e.strerror})"))
        return out
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            out.append(e)
        elif not (e.name in allowed_files and e.is_file(follow_symlinks=False)):
            strays.append(Stray(Path(e.path), "a symlink (never followed)" if e.is_symlink() else "not a directory"))
    return out


def _flush_files(path: Path, manifest: dict | None, strays: list[Stray]) -> dict[str, Path]:
    """table -> file of one flush directory: the manifest's files (legacy: `<table>.parquet`) that are
    regular files; a listed file that is absent is left out (verify reports it), the rest are strays."""
    listed = set(manifest["files"]) if manifest is not None else None
    files = {}
    try:
        entries = _entries(path)
    except OSError:  # moved to quarantine by a repair while we walked: no longer in the archive
        return files
    for e in entries:
        name = e.name
        if name == MANIFEST:
            continue
        is_table = name.endswith(".parquet") and (name in listed if listed is not None else name[:-8] in TABLES)
        if not is_table:
            strays.append(Stray(Path(e.path), "not listed in the flush's manifest" if listed is not None
                                else "not an archive table file"))
        elif not e.is_file(follow_symlinks=False):
            strays.append(Stray(Path(e.path), "a symlink (never followed)" if e.is_symlink() else "not a regular file"))
        else:
            files[name[:-8]] = Path(e.path)
    return files


def walk(archive: Path | S3Location, topic: str | None = None, skip: Container[str] = frozenset()
         ) -> tuple[list[FlushDir], list[Stray]]:
    """Every flush directory (by topic, incarnation, name) and every stray entry, never following a symlink.
    `skip`: flush directory paths (as str) to leave out without reading their manifests (a reader that keeps
    what it read, so each walk costs only what is new)."""
    if is_s3(archive):
        from store.archive_s3 import walk_s3

        return walk_s3(archive, topic, skip)
    flushes: list[FlushDir] = []
    strays: list[Stray] = []
    if not archive.is_dir():
        return flushes, strays
    for topic_dir in _dirs(archive, strays, allowed_files=(LOCK,)):
        if topic_dir.name in (TMP, QUARANTINE) or (topic and topic_dir.name != topic):
            continue
        for id_dir in _dirs(Path(topic_dir.path), strays):
            for d in _dirs(Path(id_dir.path), strays):
                m = _NAME.fullmatch(d.name)
                path = Path(d.path)
                if not m or m["topic"] != topic_dir.name:
                    strays.append(Stray(path, "not a flush directory name (<topic>+<partition>+<first>+<last>)"))
                    continue
                if skip and str(path) in skip:
                    continue
                manifest, error = None, None
                try:
                    manifest = read_manifest(path)
                except ValueError as e:  # read like a flush without one; verify reports the flush as damaged
                    error = str(e)
                    _warn(path, error)
                flushes.append(FlushDir(m["topic"], id_dir.name, int(m["partition"]), int(m["start"]), int(m["end"]),
                                        path, manifest, _flush_files(path, manifest, strays), error))
    return flushes, strays


def list_flushes(archive: Path | S3Location, topic: str | None = None, skip: Container[str] = frozenset()
                 ) -> list[FlushDir]:
    """Every flush directory (but those in `skip`, see `walk`); stray entries are skipped with a warning
    (`walk` returns them)."""
    flushes, strays = walk(archive, topic, skip)
    for s in strays:
        _warn(s.path, s.why)
    return flushes


def relative(archive: Path | S3Location, path) -> str:
    """A flush's (or file's) path inside the archive, `topic/topic_id/flush`: the same string for a local
    directory and a bucket, so dataset manifests name their inputs the same way on both."""
    if is_s3(archive):
        text = str(path)
        if not archive.within(text) or text == archive.root:
            raise ValueError(f"{text} is not inside the archive {archive}")
        return text[len(archive.root) + 1:]
    return str(Path(path).relative_to(archive))


def archived_files(archive: Path | S3Location) -> dict[str, list[Path]]:
    """Every archived Parquet file by table name (an event type or dead_letters), in path order, from one
    walk of the layout. Walking instead of globbing: a writer's temp directory vanishing mid-walk cannot
    fail a reader, and nothing outside the layout is read."""
    files: dict[str, list[Path]] = {}
    for d in list_flushes(archive):
        for table, f in sorted(d.files.items()):
            files.setdefault(table, []).append(f)
    return files


def recover_positions(archive: Path | S3Location, topic: str, topic_id: str) -> dict[int, int]:
    """Next offset to read per partition of this topic incarnation: 1 + the highest archived last offset."""
    if is_s3(archive):
        from store.archive_s3 import recover_positions_s3

        return recover_positions_s3(archive, topic, topic_id)
    pos: dict[int, int] = {}
    id_dir = archive / topic / topic_id
    if not id_dir.is_dir() or id_dir.is_symlink():
        return pos
    for d in os.scandir(id_dir):
        m = _NAME.fullmatch(d.name)
        if m and d.is_dir(follow_symlinks=False):
            p = int(m["partition"])
            pos[p] = max(pos.get(p, 0), int(m["end"]) + 1)
    return pos
