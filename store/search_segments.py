"""Segments of the search's word index: the index of some archived step files, as Parquet, and how one is built.

    d = build_segment(root, archive, keys)   # keys: (archive-relative path, size, mtime_ns) of step files
    seg = Segment.load(d)                    # words (sorted) -> rows, and every row's event id, rollout, step
    rows = seg.matching("seq", "suffix")     # segment row numbers of the rows holding a word ending in "seq"

A word is a maximal run of `[a-z0-9_]` in DuckDB's `lower(content) || ' ' || lower(tool_call.arguments)`;
`terms` cuts a needle into its words the same way and says how each must sit in a word of the text (see
store.search_index). Files in a segment: `postings.parquet` (token, rows: list<int32>), `rows.parquet`
(ROW_COLUMNS, `file`: the file's place in the segment, `row`: the row's place in the file) and `files.json`
(the keys). A segment directory is written whole under a temporary name, then renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

WORD = re.compile(r"[a-z0-9_]+")  # what a word is, here and in the index (DuckDB's regex on the lowered text)
ROW_COLUMNS = ("event_id", "rollout_id", "step_idx", "role", "produced_at", "kafka_offset")
TOKENS_SQL = r"""
    SELECT token, list(row ORDER BY row)::INTEGER[] AS rows FROM (
        SELECT DISTINCT unnest(regexp_extract_all(lower(content) || ' ' || coalesce(lower(args), ''),
                                                  '[a-z0-9_]+')) AS token, row FROM t)
    GROUP BY token ORDER BY token"""


def terms(needle: str) -> list[tuple[str, str]]:
    """The needle's words and how each must sit in a word of the text: `exact` (bounded on both sides within the
    needle), `suffix` (the needle starts inside it), `prefix` (the needle ends inside it), `contains` (both)."""
    out = []
    for m in WORD.finditer(needle):
        left, right = m.start() == 0, m.end() == len(needle)
        out.append((m.group(), "contains" if left and right else "suffix" if left else "prefix" if right else "exact"))
    return out


def file_key(path: Path, archive: Path) -> tuple[str, int, int]:
    st = os.stat(path)
    return str(path.relative_to(archive)), st.st_size, st.st_mtime_ns


def read_columns(path: str, columns: list[str]) -> pa.Table:
    """Columns of an archived step file; a column the file lacks (written before it existed) reads as nulls."""
    have = set(pq.read_schema(path).names)
    t = pq.read_table(path, columns=[c for c in columns if c in have])
    for c in columns:
        if c not in have:
            t = t.append_column(c, pa.nulls(t.num_rows))
    return t.select(columns)


def read_texts(path: str) -> pa.Table:
    """content, tool_name, tool_arguments of every row of a step file."""
    t = read_columns(path, ["content", "tool_call"])
    call = t.column("tool_call")
    if pa.types.is_struct(call.type):
        name, args = pc.struct_field(call, "name"), pc.struct_field(call, "arguments")
    else:
        name = args = pa.nulls(t.num_rows, pa.string())
    return pa.table({"content": t.column("content"), "tool_name": name, "tool_arguments": args})


@dataclass
class Segment:
    """The index of some archive files, loaded: `files` (path, size, mtime_ns) in order, `rows` one per row of
    those files in that order (ROW_COLUMNS and `file`, `row`), words in `vocab` (sorted) with their rows
    `values[offsets[i]:offsets[i + 1]]` (segment row numbers)."""

    name: str
    files: list[tuple[str, int, int]]
    rows: pa.Table
    vocab: pa.Array
    offsets: np.ndarray
    values: np.ndarray

    @classmethod
    def load(cls, d: Path) -> "Segment":
        meta = json.loads((d / "files.json").read_text())
        post = pq.read_table(d / "postings.parquet")
        lists = post.column("rows").combine_chunks()
        return cls(d.name, [tuple(f) for f in meta["files"]], pq.read_table(d / "rows.parquet"),
                   post.column("token").combine_chunks(), lists.offsets.to_numpy().astype(np.int64),
                   lists.values.to_numpy())

    def matching(self, word: str, kind: str) -> np.ndarray:
        """Segment row numbers of the rows holding a word that `word` fits as `kind` (see `terms`)."""
        test = {"exact": pc.equal, "prefix": pc.starts_with, "suffix": pc.ends_with,
                "contains": pc.match_substring}[kind]
        hit = np.flatnonzero(test(self.vocab, word).to_numpy(zero_copy_only=False))
        if len(hit) == 0:
            return np.zeros(0, np.int32)
        return np.concatenate([self.values[self.offsets[i]:self.offsets[i + 1]] for i in hit])


def build_segment(root: Path, archive: Path, keys: list[tuple[str, int, int]]) -> Optional[Path]:
    """Indexes the archive files `keys` into a new segment directory under `root` (written whole, then renamed
    into place); None when a file changed or left while it was read (the next update sees the new state)."""
    name = "seg-" + hashlib.sha256(json.dumps(keys).encode()).hexdigest()[:20]
    if (root / name).is_dir():
        return root / name
    rows, postings, base = [], [], 0
    con = duckdb.connect(config={"enable_external_access": False, "autoinstall_known_extensions": False})
    try:
        for k, key in enumerate(keys):
            path = archive / key[0]
            try:
                meta = read_columns(str(path), list(ROW_COLUMNS))
                t = read_texts(str(path))
                if file_key(path, archive) != key:
                    return None
            except FileNotFoundError:
                return None
            n = t.num_rows
            rows.append(meta.append_column("file", pa.array(np.full(n, k, np.int32)))
                        .append_column("row", pa.array(np.arange(n, dtype=np.int32))))
            t = pa.table({"content": t.column("content"), "args": t.column("tool_arguments"),
                          "row": pa.array(np.arange(base, base + n, dtype=np.int32))})
            con.register("t", t)
            postings.append(con.sql(TOKENS_SQL).to_arrow_table())
            con.unregister("t")
            base += n
        con.register("p", pa.concat_tables(postings) if postings else
                     pa.table({"token": pa.array([], pa.string()), "rows": pa.array([], pa.list_(pa.int32()))}))
        merged = con.sql("SELECT token, flatten(list(rows))::INTEGER[] AS rows FROM p GROUP BY token "
                         "ORDER BY token").to_arrow_table()
    finally:
        con.close()
    tmp = root / f".tmp-{os.getpid()}-{threading.get_ident()}-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pq.write_table(pa.concat_tables(rows) if rows else empty_rows(), tmp / "rows.parquet")
    pq.write_table(merged, tmp / "postings.parquet")
    (tmp / "files.json").write_text(json.dumps({"files": keys}))
    try:
        os.rename(tmp, root / name)
    except OSError:  # another process built the same segment meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return root / name


def empty_rows() -> pa.Table:
    from schemas.arrow import SCHEMAS

    schema = SCHEMAS["step"]
    return pa.table({**{c: pa.array([], schema.field(c).type) for c in ROW_COLUMNS},
                     "file": pa.array([], pa.int32()), "row": pa.array([], pa.int32())})
