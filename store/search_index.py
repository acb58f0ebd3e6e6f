"""A word index over the archived steps' text, so the viewer's full-text search reads only the steps that can match.

    index = StepIndex(settings)            # segments under <home>/index/steps/, built lazily
    index.update()                         # indexes the archived step files not indexed yet (the viewer: a thread)
    snap = index.snapshot()                # the archive's step files now: indexed ones, and the rest (pending)
    mask = snap.candidates("seq 1 3000")   # bool per row of snap.rows: a superset of the rows that contain it
    texts = snap.texts(gids)               # content, tool_name, tool_arguments of those rows, read from the archive

What is indexed: each step row's words, where a word is a maximal run of `[a-z0-9_]` in DuckDB's `lower(content)`
and `lower(tool_call.arguments)` (the very text the search's exact match reads). A posting list per word holds
the rows it occurs in (Parquet: `postings.parquet`, one row per word; `rows.parquet` the rows' event id,
rollout, step and archive position; store.search_segments). A needle the search looks for is a substring of the lowered text, so each
of its own words is a word of that text, except where the needle ends: the first word may be the tail of a
longer word, the last its head, a needle of one word any part of one. `candidates` takes, for each word of the
needle, the rows holding a word of the text that fits that way, and intersects them; the caller confirms each
candidate with the exact match. A needle without such a word (`->`) has no candidates to offer: None, every row.

Freshness: the archive's files are immutable, so a segment (the index of some files, named by their paths,
sizes and modification times) never goes stale; a file it covers that was rewritten (a repair) or removed (a
quarantine) is simply not used from it. Files no segment covers are *pending*: every row of theirs is a
candidate (read and matched exactly, like a scan) until `update` indexes them into a new segment. More than
MAX_SEGMENTS segments in use are merged into one by rebuilding. Local archives only (on S3 the search scans).
"""

from __future__ import annotations

import shutil
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import duckdb
import numpy as np
import pyarrow as pa

from core.settings import Settings
from store.archive import archived_files
from core.objstore import is_s3
from store.search_segments import (ROW_COLUMNS, Segment, build_segment, empty_rows, file_key, read_columns, read_texts,
                                   terms)

__all__ = ["MAX_SEGMENTS", "Snapshot", "StepIndex", "terms"]
MAX_SEGMENTS = 8  # beyond this many segments in use, `update` rebuilds one over every file
SEGMENT_FILES = 256  # archive files per segment built at once (bounds the build's memory)
CACHE_BYTES = 96 << 20  # step texts kept in memory for the exact match of later searches


class Snapshot:
    """The archive's step files at one moment (`files`, path order: the catalog's `archive_file` order) and every
    row of them (`rows`: ROW_COLUMNS, `file` its place in `files`, `row` its place in the file; a row's place in
    this table is its `gid`). `winner`: the copy of its event_id the SQL views keep (the lowest file, then offset);
    `pending`: rows of files no segment covers."""

    def __init__(self, files: list[str], keys: list[tuple], rows: pa.Table, parts: list[tuple[Segment, np.ndarray]],
                 pending: np.ndarray, texts):
        self.files, self.keys, self.rows, self.parts, self.pending = files, keys, rows, parts, pending
        self._texts = texts  # (path, key) -> the file's texts (the index's cache)
        con = duckdb.connect(config={"enable_external_access": False, "autoinstall_known_extensions": False})
        try:
            con.register("r", rows.select(["event_id", "file", "kafka_offset"]).append_column(
                "gid", pa.array(np.arange(rows.num_rows, dtype=np.int64))))
            keep = con.sql("SELECT arg_min(gid, (file, kafka_offset)) FROM r GROUP BY event_id").fetchnumpy()
        finally:
            con.close()
        self.winner = np.zeros(rows.num_rows, bool)
        self.winner[next(iter(keep.values())).astype(np.int64)] = True
        self._orders: dict = {}

    def __len__(self) -> int:
        return self.rows.num_rows

    def candidates(self, needle: str) -> Optional[np.ndarray]:
        """Bool per row: may hold `needle` (a superset of the rows whose lowered text contains it); None when the
        needle has no word to look up (every row may)."""
        words = terms(needle)
        if not words:
            return None
        mask = np.ones(len(self), bool)
        for word, kind in words:
            has = self.pending.copy()
            for seg, to_gid in self.parts:
                gids = to_gid[seg.matching(word, kind)]
                has[gids[gids >= 0]] = True
            mask &= has
        return mask

    def order(self, started: pa.Table, key) -> np.ndarray:
        """gids of the winner rows, newest rollouts first (`started`: rollout_id, started_at), then rollout_id,
        step_idx, produced_at, event_id: the search's order. Cached per `key` (the state of `started`)."""
        if key not in self._orders:
            con = duckdb.connect(config={"enable_external_access": False, "autoinstall_known_extensions": False})
            try:
                con.register("r", self.rows.select(["rollout_id", "step_idx", "produced_at", "event_id"]).append_column(
                    "gid", pa.array(np.arange(len(self), dtype=np.int64))).filter(pa.array(self.winner)))
                con.register("s", started.select(["rollout_id", "started_at"]))
                order = con.sql("SELECT r.gid FROM r LEFT JOIN s USING (rollout_id) ORDER BY s.started_at DESC NULLS "
                                "LAST, r.rollout_id, r.step_idx, r.produced_at, r.event_id").fetchnumpy()
            finally:
                con.close()
            self._orders = {key: next(iter(order.values())).astype(np.int64)}
        return self._orders[key]

    def texts(self, gids: np.ndarray) -> pa.Table:
        """content, tool_name, tool_arguments of rows `gids`, in that order (read from the archive files)."""
        gids = np.asarray(gids, np.int64)
        file = self.rows.column("file").to_numpy()[gids]
        row = self.rows.column("row").to_numpy()[gids]
        parts, where = [], []
        for f in np.unique(file).tolist():
            at = np.flatnonzero(file == f)
            parts.append(self._texts(self.files[f], self.keys[f]).take(pa.array(row[at])))
            where.append(at)
        if not parts:
            return pa.table({"content": pa.array([], pa.string()), "tool_name": pa.array([], pa.string()),
                             "tool_arguments": pa.array([], pa.string())})
        back = np.empty(len(gids), np.int64)
        back[np.concatenate(where)] = np.arange(len(gids))
        return pa.concat_tables(parts).take(pa.array(back))


class StepIndex:
    """The index of one data home's archive (see the module docstring); thread-safe."""

    def __init__(self, settings: Settings):
        self.archive = settings.archive
        self.root = Path(settings.home) / "index" / "steps"
        self.enabled = not is_s3(self.archive)
        self._lock = threading.Lock()
        self._segments: dict[str, Segment] = {}
        self._snap: Optional[tuple[tuple, Snapshot]] = None
        self._cache: OrderedDict[tuple, pa.Table] = OrderedDict()  # file key -> texts, least recently used first
        self._updater: Optional[threading.Thread] = None
        self.errors: list[str] = []  # why an update failed (the search scans meanwhile)

    def _keys(self) -> list[tuple[str, int, int]]:
        keys = []
        for f in archived_files(self.archive).get("step", []):
            try:
                keys.append(file_key(Path(f), self.archive))
            except FileNotFoundError:  # quarantined while we listed: no longer in the archive
                continue
        return keys

    def _load(self) -> dict[str, Segment]:
        """The segments on disk, loaded once each (one that cannot be read is left out: its files are pending)."""
        names = sorted(p.name for p in self.root.glob("seg-*")) if self.root.is_dir() else []
        for name in names:
            if name not in self._segments:
                try:
                    self._segments[name] = Segment.load(self.root / name)
                except (OSError, ValueError, KeyError, pa.ArrowException):
                    continue
        for gone in set(self._segments) - set(names):
            del self._segments[gone]
        return dict(self._segments)

    @staticmethod
    def _assign(keys: list, segments: dict[str, Segment]) -> dict[tuple, tuple[Segment, int]]:
        """Archive file -> (segment, its place there): the largest segments first."""
        out: dict[tuple, tuple[Segment, int]] = {}
        current = set(keys)
        for seg in sorted(segments.values(), key=lambda s: (-len(s.files), s.name)):
            for i, k in enumerate(seg.files):
                if k in current:
                    out.setdefault(k, (seg, i))
        return out

    def snapshot(self) -> Snapshot:
        """The archive's step files now (cached while neither they nor the segments change)."""
        keys = self._keys()
        with self._lock:
            segments = self._load()
            state = (tuple(keys), tuple(sorted(segments)))
            if self._snap is not None and self._snap[0] == state:
                return self._snap[1]
            where = self._assign(keys, segments)
            tables, pending, to_gid, base = [], [], {}, 0
            for pos, key in enumerate(keys):
                if key in where:
                    seg, i = where[key]
                    starts = np.searchsorted(seg.rows.column("file").to_numpy(), [i, i + 1])
                    t = seg.rows.slice(starts[0], starts[1] - starts[0])
                    m = to_gid.setdefault(seg.name, np.full(seg.rows.num_rows, -1, np.int64))
                    m[starts[0]:starts[1]] = np.arange(base, base + t.num_rows)
                    pending.append(np.zeros(t.num_rows, bool))
                    t = t.select(list(ROW_COLUMNS) + ["row"])
                else:
                    try:
                        t = read_columns(str(self.archive / key[0]), list(ROW_COLUMNS))
                    except FileNotFoundError:  # quarantined since it was listed: no longer in the archive
                        t = empty_rows().select(list(ROW_COLUMNS))
                    t = t.append_column("row", pa.array(np.arange(t.num_rows, dtype=np.int32)))
                    pending.append(np.ones(t.num_rows, bool))
                tables.append(t.append_column("file", pa.array(np.full(t.num_rows, pos, np.int32))))
                base += t.num_rows
            rows = pa.concat_tables(tables) if tables else empty_rows()
            snap = Snapshot([str(self.archive / k[0]) for k in keys], keys, rows,
                            [(segments[n], m) for n, m in to_gid.items()],
                            np.concatenate(pending) if pending else np.zeros(0, bool), self._file_texts)
            self._snap = (state, snap)
            return snap

    def _file_texts(self, path: str, key: tuple) -> pa.Table:
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        t = read_texts(path)
        with self._lock:
            self._cache[key] = t  # by (path, size, mtime): a rewritten file is read again
            while sum(x.nbytes for x in self._cache.values()) > CACHE_BYTES and len(self._cache) > 1:
                self._cache.popitem(last=False)
        return t

    def pending(self) -> int:
        """Archive step files no segment covers yet."""
        keys = self._keys()
        with self._lock:
            return len(keys) - len(self._assign(keys, self._load()))

    def update(self) -> int:
        """Indexes the files no segment covers (every file, into one segment, when that would put more than
        MAX_SEGMENTS in use) and removes the segments no current file needs; returns the files indexed."""
        if not self.enabled:
            return 0
        keys = self._keys()
        with self._lock:
            segments = self._load()
            where = self._assign(keys, segments)
        todo = [k for k in keys if k not in where]
        if not todo:
            return 0
        chunks = [todo[i:i + SEGMENT_FILES] for i in range(0, len(todo), SEGMENT_FILES)]
        if len({seg.name for seg, _ in where.values()}) + len(chunks) > MAX_SEGMENTS:
            chunks = [keys]  # merge: one segment over everything
        built = []
        for chunk in chunks:
            d = build_segment(self.root, self.archive, chunk)
            if d is None:
                return 0  # the archive changed under the build: the next update starts over
            built.append(d.name)
        with self._lock:
            segments = self._load()
            keep = {seg.name for seg, _ in self._assign(keys, segments).values()}
        for name in set(segments) - keep - set(built):  # superseded or of files that left the archive
            shutil.rmtree(self.root / name, ignore_errors=True)
        return sum(map(len, chunks))

    def update_async(self) -> None:
        """`update` in a daemon thread, unless one runs already."""
        with self._lock:
            if not self.enabled or (self._updater is not None and self._updater.is_alive()):
                return
            self._updater = threading.Thread(target=self._update_logged, name="klong-ui-index", daemon=True)
            self._updater.start()

    def _update_logged(self) -> None:
        try:
            self.update()
        except (OSError, duckdb.Error, pa.ArrowException) as e:  # the search scans the files meanwhile
            self.errors.append(f"{type(e).__name__}: {e}")

    def wait(self, timeout: float = 600.0) -> None:
        """Waits for a running `update_async` to end (tests, the benchmark)."""
        t = self._updater
        if t is not None:
            t.join(timeout)
