"""Reading the archive inputs of a dataset build: which flushes, DuckDB views over them, step/rollout/judge rows.

    >>> con = connect(InputSet.scan(home / "archive"))   # views raw_<type> and <type> (one row per event_id)
    >>> InputSet.scan(loc, cache=cache_dir(home, loc))   # a bucket (core.objstore): verified local copies

`InputSet` names the flush directories (and optional Kafka offset ranges) a build reads, so a version can
be rebuilt from exactly its events (`consumers.replay`). `connect` opens DuckDB over those Parquet files;
the readers below return numpy/dict columns for the plan (`consumers.dataset_plan`): the step table
(small columns only, duplicates of one (rollout_id, step_idx) marked by `copy`), registered task splits,
judge results per rollout, and the text of text-only steps tokenized (or chat-rendered) on demand.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from core.chat import ChatTokenizer, TemplateError
from schemas.arrow import SCHEMAS
from schemas.errors import ConfigError
from store.archive import list_flushes, relative
from store.archive_cache import staged
from core.objstore import S3Location, is_s3

INPUT_TYPES = ("step", "rollout_started", "rollout_resumed", "rollout_ended", "judge_result", "task_registered")


@dataclass(frozen=True)
class InputSet:
    """Which archived events a build reads: flush directories, optionally only some Kafka offsets. The
    archive is a local directory or a bucket prefix; a bucket's objects are read from local copies in
    `cache` (store.archive_cache), so DuckDB reads files on disk either way."""

    archive: Path | S3Location
    flushes: tuple[str, ...]  # archive-relative: topic/topic_id/topic+partition+first+last, sorted
    ranges: tuple[tuple[str, int, int, int], ...] = ()  # (topic, partition, first, last): only these offsets
    cache: Path | None = field(default=None, compare=False)  # for a bucket archive: where its objects are copied

    @classmethod
    def scan(cls, archive: Path | S3Location, cache: Path | None = None) -> "InputSet":
        """Every flush directory of the archive that holds an event type a dataset reads."""
        keep = [f for f in list_flushes(archive) if any(t in f.files for t in INPUT_TYPES)]
        return cls(archive, tuple(sorted(relative(archive, f.path) for f in keep)), cache=cache)

    def present(self) -> set[str]:
        """The flushes (archive-relative) the archive holds now."""
        return {relative(self.archive, d.path) for d in list_flushes(self.archive)}

    def listing(self) -> dict[str, dict[str, Path]]:
        """Flush (archive-relative) -> its table files on local disk, as the archive layout names them
        (store.archive: strays and symlinks are skipped); a bucket's files of this input set are copied
        into `cache` first."""
        flushes = list_flushes(self.archive)
        if not is_s3(self.archive):
            return {relative(self.archive, d.path): d.files for d in flushes}
        if self.cache is None:
            raise ConfigError(f"archive {self.archive}: a build from a bucket needs a cache directory")
        wanted = set(self.flushes)
        return staged(self.archive, [d for d in flushes if relative(self.archive, d.path) in wanted],
                      frozenset(INPUT_TYPES), self.cache)

    def files(self, etype: str, listed: dict[str, dict[str, Path]] | None = None) -> list[str]:
        listed = self.listing() if listed is None else listed
        return [str(p) for f in self.flushes if (p := listed.get(f, {}).get(etype)) is not None]

    def watermark(self) -> dict[str, list[list[int]]]:
        """"topic/topic_id/partition" -> merged [first, last] offset ranges the flushes cover."""
        spans: dict[str, list[list[int]]] = {}
        for f in self.flushes:
            topic, topic_id, name = f.split("/")
            _, part, first, last = name.rsplit("+", 3)
            spans.setdefault(f"{topic}/{topic_id}/{int(part)}", []).append([int(first), int(last)])
        out = {}
        for key, rs in spans.items():
            merged: list[list[int]] = []
            for a, b in sorted(rs):
                if merged and a <= merged[-1][1] + 1:
                    merged[-1][1] = max(merged[-1][1], b)
                else:
                    merged.append([a, b])
            out[key] = merged
        return out

    def predicate(self) -> str:
        if not self.ranges:
            return ""
        terms = [f"(kafka_topic = '{t}' AND kafka_partition = {p} AND kafka_offset BETWEEN {a} AND {b})"
                 for t, p, a, b in self.ranges]
        return "WHERE " + " OR ".join(terms)


def sql_list(paths: list[str]) -> str:
    return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"


def connect(inputs: InputSet) -> duckdb.DuckDBPyConnection:
    """DuckDB views `raw_<type>` (rows as archived, within the input set) and `<type>` (one row per event_id)."""
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": True})
    where = inputs.predicate()
    listed = inputs.listing()
    for etype in INPUT_TYPES:
        files = inputs.files(etype, listed)
        if files:
            src = f"read_parquet({sql_list(files)}, filename=true, file_row_number=true, union_by_name=true)"
        else:
            schema = SCHEMAS[etype].append(pa.field("filename", pa.string())).append(pa.field("file_row_number", pa.int64()))
            con.register(f"_empty_{etype}", pa.table({f.name: pa.array([], f.type) for f in schema}))
            src = f"_empty_{etype}"
        con.execute(f"CREATE VIEW raw_{etype} AS SELECT * FROM {src} {where}")
        if etype != "step":  # steps: deduplicated in the plan query, without their token arrays
            con.execute(f"CREATE VIEW {etype} AS SELECT DISTINCT ON (event_id) * FROM raw_{etype} "
                        "ORDER BY event_id, filename, kafka_offset")  # the first archived copy, as the SQL views keep
    return con


def arrow(con: duckdb.DuckDBPyConnection, query: str) -> pa.Table:
    return con.sql(query).to_arrow_table()


def scalar(con: duckdb.DuckDBPyConnection, query: str) -> Any:
    return con.execute(query).fetchall()[0][0]


STEPS_SQL = """
CREATE TEMP TABLE step_meta AS
WITH d AS (
    SELECT DISTINCT ON (event_id) event_id, rollout_id, step_idx, role, pinned, policy_version, produced_at,
           kafka_topic, kafka_partition, kafka_offset, octet_length(token_ids) // 4 AS n_tokens, filename, file_row_number,
           {context_start} AS context_start, {sampling}
    FROM raw_step ORDER BY event_id, filename, kafka_offset)
SELECT *, row_number() OVER (PARTITION BY rollout_id, step_idx
                             ORDER BY produced_at, kafka_topic, kafka_partition, kafka_offset, event_id) AS copy
FROM d"""
ROLLOUTS_SQL = """
WITH s AS (SELECT DISTINCT ON (rollout_id) rollout_id, task_id, group_id, stage, iteration, {tokenizer} AS tokenizer
           FROM rollout_started ORDER BY rollout_id, produced_at, event_id),
e AS (SELECT DISTINCT ON (rollout_id) rollout_id, status, n_steps, produced_at AS ended_at
      FROM rollout_ended ORDER BY rollout_id, produced_at DESC, event_id DESC),
r AS (SELECT DISTINCT ON (rollout_id) rollout_id, stage, iteration, produced_at AS resumed_at
      FROM rollout_resumed ORDER BY rollout_id, produced_at DESC, event_id DESC)
SELECT s.rollout_id, s.task_id, s.group_id, s.tokenizer, coalesce(r.stage, s.stage) AS stage,
       coalesce(r.iteration, s.iteration) AS iteration, e.status, e.n_steps,
       e.rollout_id IS NULL OR coalesce(r.resumed_at > e.ended_at, false) AS pending
FROM s LEFT JOIN e USING (rollout_id) LEFT JOIN r USING (rollout_id) ORDER BY s.rollout_id"""




def column_or(con: duckdb.DuckDBPyConnection, view: str, name: str, default: str) -> str:
    """`name`, or `default` when no archived file of the view has that (newer) column."""
    return name if name in {r[0] for r in con.execute(f"DESCRIBE {view}").fetchall()} else default


# Which ids an assistant step sampled and how (schemas.events.StepPayload); archives older than these columns
# read them as unknown (consumers.sampled infers the range; temperature 1.0).
SAMPLING_COLUMNS = {"n_generation_prompt": "NULL::BIGINT", "n_sampled": "NULL::BIGINT",
                    "finish_reason": "NULL::VARCHAR", "temperature": "NULL::DOUBLE"}


def step_table(con: duckdb.DuckDBPyConnection, tokenizer, drops: Counter) -> dict:
    sampling = ", ".join(f"{column_or(con, 'raw_step', c, d)} AS {c}" for c, d in SAMPLING_COLUMNS.items())
    con.execute(STEPS_SQL.format(context_start=column_or(con, "raw_step", "context_start", "NULL::BIGINT"),
                                 sampling=sampling))
    drops["duplicate_step"] += scalar(con, "SELECT count(*) FROM step_meta WHERE copy > 1")
    t = arrow(con, "SELECT rollout_id, step_idx, role = 'assistant' AS is_asst, pinned, policy_version, n_tokens, "
                    "coalesce(context_start, -1) AS context_start, filename, file_row_number, "
                    "coalesce(n_generation_prompt, -1) AS n_generation_prompt, coalesce(n_sampled, -1) AS n_sampled, "
                    "coalesce(finish_reason = 'length', false) AS cut, coalesce(temperature, 'NaN'::DOUBLE) AS temperature "
                    "FROM step_meta WHERE copy = 1 ORDER BY rollout_id, step_idx")
    files = t.column("filename").combine_chunks().dictionary_encode()
    names = files.dictionary.to_pylist()
    order = np.argsort(names)  # file index = rank of the path: flush names sort by partition, then offset
    rank = np.empty(len(names), np.int64)
    rank[order] = np.arange(len(names))
    n_tokens = t.column("n_tokens").to_numpy(zero_copy_only=False)
    text_only = np.isnan(n_tokens) if n_tokens.dtype.kind == "f" else np.zeros(len(n_tokens), bool)
    steps = {
        "rollout_id": t.column("rollout_id").to_numpy(zero_copy_only=False),
        "step_idx": t.column("step_idx").to_numpy(), "is_asst": t.column("is_asst").to_numpy(zero_copy_only=False),
        "pinned": t.column("pinned").to_numpy(zero_copy_only=False),
        "policy_version": t.column("policy_version").to_numpy(),
        "n_tokens": np.nan_to_num(n_tokens, nan=0).astype(np.int64), "text_only": text_only,
        "file": rank[files.indices.to_numpy()] if len(names) else np.zeros(0, np.int64),
        "row": t.column("file_row_number").to_numpy(), "files": [names[i] for i in order],
        "context_start": t.column("context_start").to_numpy(),  # -1: not recorded
        "n_generation_prompt": t.column("n_generation_prompt").to_numpy(),  # -1: not recorded
        "n_sampled": t.column("n_sampled").to_numpy(),  # -1: not recorded
        "cut": t.column("cut").to_numpy(zero_copy_only=False),  # finish_reason length: no end-of-turn id sampled
        "temperature": t.column("temperature").to_numpy(zero_copy_only=False),  # NaN: not recorded
    }
    if text_only.any():  # text-only steps: their token count comes from the tokenizer
        idx = np.flatnonzero(text_only)
        if isinstance(tokenizer, ChatTokenizer):  # whole rollouts rendered with the template, kept for pass 2
            steps["rendered"] = _render_rollouts(con, steps, idx, tokenizer)
        steps["n_tokens"][idx] = [len(a) for a in tokenize_steps(con, steps, idx, tokenizer)]
    return steps


def rollout_tools(con) -> dict[str, list]:
    """rollout_id -> the tool schemas its (first) rollout_started recorded; rollouts without them are left out
    (archives from before the `tools` field read NULL)."""
    column = column_or(con, "rollout_started", "tools", "NULL::VARCHAR")
    t = arrow(con, f"SELECT rollout_id, arg_min({column}, (produced_at, event_id)) AS tools FROM rollout_started "
                   "GROUP BY rollout_id")
    out = {}
    for rid, text in zip(t.column("rollout_id").to_pylist(), t.column("tools").to_pylist()):
        if text is None:
            continue
        try:
            tools = json.loads(text)
        except ValueError:
            tools = None
        if not (isinstance(tools, list) and all(isinstance(x, dict) for x in tools)):
            raise ConfigError(f"rollout {rid}: rollout_started's `tools` is not a JSON list of tool schemas")
        if tools:
            out[rid] = tools
    return out


def _render_rollouts(con, steps: dict, idx: np.ndarray, chat: ChatTokenizer) -> dict[int, np.ndarray]:
    """Step row -> ids: each text-only rollout's steps as chat messages (role, content) rendered with the model
    directory's template and split per message (`core.chat`), with the tool schemas its rollout_started
    recorded as the template's `tools` (the `<tools>` block an import with `--tokenizer` renders too)."""
    contents = _contents(con, steps, idx)
    tools = rollout_tools(con)
    t = arrow(con, "SELECT rollout_id, step_idx, role FROM step_meta WHERE copy = 1 ORDER BY rollout_id, step_idx")
    role = t.column("role").to_pylist()
    rid = steps["rollout_id"]
    n_steps = dict(zip(*np.unique(rid, return_counts=True)))
    out: dict[int, np.ndarray] = {}
    k = 0
    while k < len(idx):
        r, j = rid[idx[k]], k
        while j < len(idx) and rid[idx[j]] == r:
            j += 1
        rows = idx[k:j]
        if n_steps[r] != len(rows):  # a build that selects it refuses it (dataset_plan); others go on
            steps.setdefault("mixed", set()).add(r)
            out.update(zip(rows.tolist(), chat.encode_batch([contents[k + n] for n in range(len(rows))])))
            k = j
            continue
        messages = [{"role": role[i], "content": contents[k + n]} for n, i in enumerate(rows)]
        try:
            spans = chat.message_spans(messages, tools.get(r))
        except TemplateError as e:
            raise ConfigError(f"rollout {r}: {e}") from e
        out.update(zip(rows.tolist(), spans))
        k = j
    return out


def _contents(con, steps: dict, idx: np.ndarray) -> list[str]:
    want = pa.table({"file": pa.array([steps["files"][f] for f in steps["file"][idx]], pa.string()),
                     "row": pa.array(steps["row"][idx]), "pos": pa.array(np.arange(len(idx)))})
    con.register("_want", want)
    t = arrow(con, "SELECT w.pos, s.content FROM raw_step s JOIN _want w "
                    "ON s.filename = w.file AND s.file_row_number = w.row ORDER BY w.pos")
    con.unregister("_want")
    return t.column("content").to_pylist()


def tokenize_steps(con, steps: dict, idx: np.ndarray, tokenizer) -> list[np.ndarray]:
    """Text-only step rows `idx` tokenized, in the order of idx (rendered with the chat template when the
    tokenizer is a model directory's, else each content encoded alone)."""
    if "rendered" in steps:
        return [steps["rendered"][i] for i in idx.tolist()]
    return tokenizer.encode_batch(_contents(con, steps, idx))


def task_splits(con) -> dict[str, bool]:
    """task_id -> True when every registration of it says split = train (once eval, always eval)."""
    t = arrow(con, "SELECT task_id, bool_and(split = 'train') AS train FROM task_registered GROUP BY task_id")
    return dict(zip(t.column("task_id").to_pylist(), t.column("train").to_pylist()))


def judge_results(con) -> dict[str, dict[str, np.ndarray]]:
    t = arrow(con, "SELECT rollout_id, step_idx, score, valid, row_number() OVER (PARTITION BY rollout_id "
                    "ORDER BY produced_at, kafka_offset, event_id) AS ord FROM judge_result ORDER BY rollout_id, ord")
    rid = t.column("rollout_id").to_pylist()
    cols = {"step_idx": t.column("step_idx").to_numpy(), "score": t.column("score").to_numpy(zero_copy_only=False),
            "valid": t.column("valid").to_numpy(zero_copy_only=False), "order": t.column("ord").to_numpy()}
    out, lo = {}, 0
    for i in range(1, len(rid) + 1):
        if i == len(rid) or rid[i] != rid[lo]:
            out[rid[lo]] = {k: v[lo:i] for k, v in cols.items()}
            lo = i
    return out
