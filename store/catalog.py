"""SQL over the archive: DuckDB views on the Parquet files, deduplicated by `event_id`.

    klong sql "SELECT task_id, status, count(*) FROM rollouts GROUP BY ALL"
    >>> Catalog(settings).sql("SELECT * FROM steps LIMIT 5")       # -> polars.DataFrame

Views: `tasks`, `rollouts`, `steps`, `step_tokens`, `snapshots`, `judge_requests`, `judge_results`,
`rollout_resumes`, `training_runs`, `dead_letters`, and `<event_type>_events` for every raw event
table. The catalog is built fresh on each connection (a handful of view definitions over the
archived files), so what the sink renamed into the archive a moment ago is visible. Files archived before
a column existed read it as NULL (`parquet_source`), so an older archive is queryable as it is.

Queries can only read the data. Every connection is locked down once its views stand: DuckDB reads
files only under the archive and the datasets directory (`allowed_directories`,
`enable_external_access=false`: no `read_text('/etc/passwd')`, `glob`, `/proc/self/environ`, no
extension downloads), and `lock_configuration=true` refuses any later `SET`. A statement that is not a
SELECT is refused, and so is `EXPLAIN ANALYZE` (it executes the explained statement: a `COPY ... TO`
an archive file would pass the type check and overwrite it); a plain EXPLAIN must explain a SELECT.
`Catalog.sql`, `arrow` and `scalar` (the Python API) go through the same checks.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa

from core.settings import Settings
from schemas.arrow import SCHEMAS, as_list_array
from schemas.errors import TerminalError
from store.archive import DEAD_LETTER_SCHEMA, DEAD_LETTERS, archived_files
from core.objstore import S3Location, is_s3

VIEW_EXTENSIONS = ["store.dataset_views", "store.tasks", "store.training", "store.rl", "store.blacklist"]
READ_ONLY = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}

DERIVED_VIEWS = {
    # Steps without the heavy token arrays; n_tokens is NULL for text-only (not yet tokenized) steps.
    "steps": """
        SELECT rollout_id, step_idx, role, content, tool_call.name AS tool_name, tool_call.arguments AS tool_arguments,
               tool_call_id, (octet_length(token_ids) // 4)::BIGINT AS n_tokens, pinned, elapsed_s, policy_version, blob_ref IS NOT NULL AS claim_checked,
               event_id, produced_at, kafka_topic, kafka_partition, kafka_offset
        FROM step_events""",
    # Token arrays are archived as little-endian bytes (schemas.arrow); int32s/float32s give them as lists.
    "step_tokens": """
        SELECT rollout_id, step_idx, role, int32s(token_ids) AS token_ids, float32s(logprobs) AS logprobs, policy_version
        FROM step_events""",
    "snapshots": "SELECT rollout_id, step_idx, ref, n_files, n_bytes, produced_at, event_id FROM snapshot_events",
    "judge_requests": """
        SELECT request_id, rollout_id, step_idx, task_id, priority, snapshot_ref, produced_at AS requested_at, event_id
        FROM judge_requested_events""",
    "judge_results": """
        SELECT request_id, rollout_id, step_idx, task_id, judge_model, score, valid, n_invalid_leaves, error,
               leaf_scores, prompt_tokens, completion_tokens, latency_s, produced_at, event_id
        FROM judge_result_events""",
    "rollout_resumes": "SELECT rollout_id, iteration, policy_version, stage, next_step_idx, produced_at FROM rollout_resumed_events",
    "training_runs": """
        SELECT run_id, phase, dataset, dataset_hash, mode, policy_version_in, policy_version_out, step, metrics,
               config, checkpoint, produced_at FROM training_run_events""",
    "tasks": """
        SELECT task_id, arg_max(title, produced_at) AS title, arg_max(split, produced_at) AS split,
               arg_max(content_hash, produced_at) AS content_hash, arg_max(rubric, produced_at) AS rubric,
               arg_max(blacklist, produced_at) AS blacklist, count(DISTINCT content_hash) AS n_versions,
               max(produced_at) AS registered_at
        FROM task_registered_events GROUP BY task_id""",
    "rollouts": """
        WITH started AS (
            SELECT rollout_id, arg_min(task_id, produced_at) AS task_id, arg_min(group_id, produced_at) AS group_id,
                   arg_min(stage, produced_at) AS stage, arg_min(iteration, produced_at) AS iteration,
                   arg_min(timeout_s, produced_at) AS timeout_s, arg_min(policy_version, produced_at) AS policy_version,
                   arg_min(scaffold, produced_at) AS scaffold, arg_min(model, produced_at) AS model,
                   min(produced_at) AS started_at
            FROM rollout_started_events GROUP BY rollout_id),
        ended AS (
            SELECT rollout_id, arg_max(status, produced_at) AS status, arg_max(n_steps, produced_at) AS n_steps,
                   arg_max(elapsed_s, produced_at) AS elapsed_s, max(produced_at) AS ended_at
            FROM rollout_ended_events GROUP BY rollout_id),
        st AS (
            SELECT rollout_id, count(*) AS steps_seen, count(*) FILTER (WHERE role = 'assistant') AS n_actions,
                   sum(n_tokens)::BIGINT AS n_tokens, max(elapsed_s) AS last_elapsed_s
            FROM steps GROUP BY rollout_id),
        judged AS (
            SELECT rollout_id, arg_max(score, (step_idx, produced_at)) AS final_score, count(*) AS n_judged
            FROM judge_results WHERE valid GROUP BY rollout_id),
        resumed AS (
            SELECT rollout_id, count(*) AS n_resumes, max(iteration) AS last_iteration,
                   arg_max(policy_version, produced_at) AS last_policy_version
            FROM rollout_resumes GROUP BY rollout_id)
        SELECT s.rollout_id, s.task_id, s.group_id, s.stage, s.iteration, s.timeout_s, s.policy_version,
               s.scaffold, s.model, s.started_at, e.ended_at, coalesce(e.status, 'running') AS status,
               coalesce(e.n_steps, st.steps_seen, 0) AS n_steps, coalesce(st.steps_seen, 0) AS steps_seen,
               coalesce(st.n_actions, 0) AS n_turns, coalesce(st.n_tokens, 0) AS n_tokens,
               coalesce(e.elapsed_s, st.last_elapsed_s) AS elapsed_s, j.final_score, coalesce(j.n_judged, 0) AS n_judged,
               coalesce(r.n_resumes, 0) AS n_resumes, coalesce(r.last_iteration, s.iteration) AS last_iteration,
               coalesce(r.last_policy_version, s.policy_version) AS last_policy_version
        FROM started s LEFT JOIN ended e USING (rollout_id) LEFT JOIN st USING (rollout_id)
             LEFT JOIN judged j USING (rollout_id) LEFT JOIN resumed r USING (rollout_id)""",
    "dead_letters": "SELECT topic, partition, \"offset\", error_kind, error, key, raw, sunk_at FROM _raw_dead_letters",
}


def first_archived(raw: str) -> str:
    """One row per event_id: the copy archived first. Producer resends are equal copies; a re-sent
    event_id with other content (a conflicting duplicate, `conflicting_duplicates`) must still give one
    answer every time, so the copy is chosen by its place in the archive, never by scan order: the lowest
    (archive file, offset), where `archive_file` is the file's index in the path-ordered list (cheaper
    than its path). Within a partition (all events of a rollout share one) paths sort by offset, so that
    is the first archived; across incarnations of a topic on the embedded broker its topic ids are
    UUIDv7, which sort by creation time. A semi-join on the narrow (event_id, position) winners measured
    faster than an ordered DISTINCT ON, which sorts whole rows (token arrays included)."""
    return (f"SELECT r.* EXCLUDE (archive_file) FROM {raw} r SEMI JOIN "
            f"(SELECT event_id, min((archive_file, kafka_offset)) AS pos FROM {raw} GROUP BY event_id) w "
            f"ON r.event_id = w.event_id AND (r.archive_file, r.kafka_offset) = w.pos")


# Event ids archived more than once with different content (everything but where they were read from).
CONFLICTS = " UNION ALL ".join(f"""
    SELECT '{name}' AS event_type, c.event_id, c.n_versions, e.kafka_topic AS kept_topic,
           e.kafka_partition AS kept_partition, e.kafka_offset AS kept_offset
    FROM (SELECT event_id, count(*) AS n_versions FROM (
            SELECT DISTINCT * EXCLUDE (kafka_topic, kafka_partition, kafka_offset, archive_file) FROM _raw_{name}
            WHERE event_id IN (SELECT event_id FROM _raw_{name} GROUP BY event_id HAVING count(*) > 1))
          GROUP BY event_id HAVING count(*) > 1) c JOIN {name}_events e USING (event_id)""" for name in SCHEMAS)


_spill_dirs: dict[str, str] = {}


def spill_dir(home: Path) -> str:
    """DuckDB's spill directory for this process: `<home>/tmp/sql/<host>-<pid>`, removed at exit. DuckDB makes
    its temp directory readable by SQL whatever `allowed_directories` says (the default, `<cwd>/.tmp/`,
    exposed whatever the user kept there), so it gets one that holds nothing but this process's own spill
    files. Directories of dead local processes are removed on first use."""
    key = str(home)
    if key not in _spill_dirs:
        import atexit
        import os
        import shutil
        import socket

        root = Path(home) / "tmp" / "sql"
        host = socket.gethostname()
        try:
            if not Path(home).is_dir():  # never create a data home (a mistyped --home) just to spill into it
                raise FileNotFoundError(home)
            root.mkdir(parents=True, exist_ok=True)
            for d in root.iterdir():
                h, _, pid = d.name.rpartition("-")
                if h == host and pid.isdigit() and not Path(f"/proc/{pid}").exists():
                    shutil.rmtree(d, ignore_errors=True)
            mine = root / f"{host}-{os.getpid()}"
            mine.mkdir(mode=0o700, exist_ok=True)
            atexit.register(shutil.rmtree, mine, True)
            _spill_dirs[key] = str(mine)
        except OSError:  # a read-only data home: no spilling (big sorts fail with out-of-memory instead)
            _spill_dirs[key] = ""
    return _spill_dirs[key]


class QueryError(TerminalError):
    """A SQL statement failed or was refused."""


def sql_str(value: str | Path) -> str:
    """A SQL string literal: quoted, with embedded quotes doubled."""
    return "'" + str(value).replace("'", "''") + "'"


def parquet_source(con: duckdb.DuckDBPyConnection, name: str, files: list, schema: pa.Schema,
                   options: str = "", extra: str = "") -> str:
    """A FROM-clause source over the Parquet `files` that has every column of `schema`, however old the files.

    The files are read by column name (`union_by_name`): a column some file lacks (written before the
    column existed) reads as NULL there. Unioned by name under an empty table of `schema` (registered as
    `_empty_<name>`), the source also has the columns no file has yet, in `schema`'s order, and an empty
    `files` gives an empty source with every column. `options`: more read_parquet arguments ("filename=true");
    `extra`: more select-list items over read_parquet (", file_index AS archive_file"), which `schema` must name."""
    con.register(f"_empty_{name}", schema.empty_table())
    if not files:
        return f"_empty_{name}"
    listed = ", ".join(sql_str(f) for f in files)
    more = f", {options}" if options else ""
    return (f"(SELECT * FROM _empty_{name} UNION ALL BY NAME "
            f"SELECT *{extra} FROM read_parquet([{listed}], union_by_name=true{more}))")


def s3_source(con: duckdb.DuckDBPyConnection, name: str, loc: S3Location, files: list, schema: pa.Schema) -> str:
    """A FROM-clause source over archived Parquet objects in a bucket: one pyarrow dataset over exactly
    `files` (registered as `_s3_<name>`; DuckDB pushes column and filter pushdown into its scans, and
    DuckDB's own file access stays locked to local directories). A column a file lacks reads as NULL; each
    file's `archive_file` is its index in `files`, carried as the fragment's partition expression."""
    import pyarrow.dataset as ds

    dataset = ds.FileSystemDataset.from_paths(
        [str(f) for f in files], schema=schema, format=ds.ParquetFileFormat(), filesystem=loc.fs,
        partitions=[ds.field("archive_file") == i for i in range(len(files))])
    con.register(f"_s3_{name}", dataset)
    return f"_s3_{name}"


def register_array_functions(con: duckdb.DuckDBPyConnection) -> None:
    """SQL functions `int32s(blob) -> INTEGER[]` and `float32s(blob) -> FLOAT[]` for archived token arrays."""
    def int32s(col):
        return as_list_array(col, "int32")

    def float32s(col):
        return as_list_array(col, "float32")

    con.create_function("int32s", int32s, ["BLOB"], "INTEGER[]", type="arrow")
    con.create_function("float32s", float32s, ["BLOB"], "FLOAT[]", type="arrow")


_EXPLAIN = re.compile(r"^\s*explain\s*(\((?P<options>[^)]*)\))?", re.I)
_ANALYZE = re.compile(r"analy[sz]e", re.I)


def check_read_only(con: duckdb.DuckDBPyConnection, statements: list) -> None:
    """QueryError unless every statement only reads: SELECT, or EXPLAIN (not ANALYZE) of a SELECT."""
    for st in statements:
        if st.type not in READ_ONLY:
            raise QueryError(f"refused: queries are read-only, and this is a {st.type.name} statement "
                             "(the archive changes only through events; use SELECT)")
        if st.type == duckdb.StatementType.EXPLAIN:
            m = _EXPLAIN.match(st.query)
            rest = st.query[m.end():] if m else ""
            if _ANALYZE.search(st.query[:m.end()] if m else st.query) or re.match(r"\s*analy[sz]e\b", rest, re.I):
                raise QueryError("refused: EXPLAIN ANALYZE executes the statement it explains; use EXPLAIN or SELECT")
            try:
                inner = con.extract_statements(rest) if m else []
            except duckdb.Error as e:
                raise QueryError(f"refused: cannot check what this EXPLAIN explains ({e})") from e
            if len(inner) != 1 or inner[0].type != duckdb.StatementType.SELECT:
                raise QueryError("refused: EXPLAIN only of a SELECT (queries are read-only)")


def lock_down(con: duckdb.DuckDBPyConnection, readable: list[Path]) -> None:
    """From now on the connection reads files only under `readable`, loads no extension it does not
    have, and refuses every SET (DuckDB's own lock-down)."""
    dirs = ", ".join(sql_str(str(Path(d).resolve()).rstrip("/") + "/") for d in readable)
    con.execute(f"SET allowed_directories = [{dirs}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET lock_configuration = true")


def _one_line(e: duckdb.Error) -> str:
    """DuckDB's error in one line; a damaged archive file gets the way out appended."""
    text = str(e).splitlines()[0] if str(e) else repr(e)
    if ".parquet" in text and any(w in text for w in ("magic bytes", "Corrupt", "corrupt", "Invalid", "truncated")):
        text += " (a damaged archive file: `klong archive verify` finds them, `klong archive repair` fixes them)"
    return text


# a query naming one of these lists or describes views: it gets every view
_CATALOG_WORDS = {"duckdb_views", "duckdb_columns", "duckdb_tables", "information_schema", "show", "describe",
                  "summarize", "pragma"}


def _words(sql: str) -> set[str]:
    return set(re.findall(r"\w+", sql.lower()))


def _views_needed(words: set[str] | None) -> tuple[set[str], set[str]] | None:
    """(DERIVED_VIEWS, event types) a query whose words are `words` reads, with what those views read in
    turn; None: every view. DuckDB binds each view it creates (reading the schema of every archived file
    it covers), so a view nobody reads costs time on every connection. The conflicts view and the
    extension views (whose queries may read anything) get every view."""
    if (words is None or "conflicting_duplicates" in words
            or any(words & set(importlib.import_module(ext).VIEW_NAMES) for ext in VIEW_EXTENSIONS)):
        return None
    derived, todo, seen = set(), [n for n in DERIVED_VIEWS if n in words], set(words)
    while todo:
        name = todo.pop()
        if name not in derived:
            derived.add(name)
            body = _words(DERIVED_VIEWS[name])
            seen |= body
            todo.extend(n for n in DERIVED_VIEWS if n in body and n not in derived)
    events = {n for n in SCHEMAS if f"{n}_events" in seen or f"_raw_{n}" in seen}
    return derived, events


class Catalog:
    def __init__(self, settings: Settings, config: dict | None = None):
        """`config`: more DuckDB settings for every connection (`memory_limit`, `threads`, `temp_directory`),
        fixed before the lock-down (`klong ui` bounds its queries this way)."""
        self.settings = settings
        self.config = dict(config or {})

    def readable_dirs(self) -> list[Path]:
        """What SQL may read: the archive and the dataset versions (nothing else of the data home)."""
        from store.datasets import datasets_dir

        archive = self.settings.archive  # on S3, SQL reads it only through the datasets registered (s3_source)
        return [*([] if is_s3(archive) else [archive]), datasets_dir(self.settings.home)]

    def connect(self, query: str | None = None) -> duckdb.DuckDBPyConnection:
        """A connection with every view; with `query`, only the views it reads (`_views_needed`; the
        extension views, VIEW_EXTENSIONS, it names): DuckDB binds each view when it is created, so the
        unused ones cost time on every connection (a freshness poll reconnects ten times a second)."""
        con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": True,
                                     "temp_directory": spill_dir(self.settings.home), **self.config})
        register_array_functions(con)
        archive = self.settings.archive
        if is_s3(archive):
            archive.check()  # a missing bucket is an error, not an empty archive
        archived = archived_files(archive)
        words = _words(query) if query is not None else None
        if words is not None and words & _CATALOG_WORDS:
            words = None  # a query that lists or describes views sees every view, the extensions' too
        needed = _views_needed(words)
        derived, events = needed or (set(DERIVED_VIEWS), set(SCHEMAS))
        for name, schema in [*SCHEMAS.items(), (DEAD_LETTERS, DEAD_LETTER_SCHEMA)]:
            if name != DEAD_LETTERS and name not in events:
                continue
            raw = f"_raw_{name}"
            # an explicit list: renamed flush directories never go away, temp ones do
            # archive_file: the file's place in the path-ordered list, which decides the copy a view keeps
            schema = schema.append(pa.field("archive_file", pa.int64()))
            if is_s3(archive):
                source = s3_source(con, name, archive, archived.get(name, []), schema)
            else:
                source = parquet_source(con, name, archived.get(name, []), schema,
                                        extra=", file_index::BIGINT AS archive_file")
            con.execute(f"CREATE VIEW {raw} AS SELECT * FROM {source}")
            if name != DEAD_LETTERS:
                con.execute(f"CREATE VIEW {name}_events AS {first_archived(raw)}")
        if needed is None:
            con.execute(f"CREATE VIEW conflicting_duplicates AS {CONFLICTS}")
        for name, body in DERIVED_VIEWS.items():
            if name not in derived:
                continue
            try:
                con.execute(f"CREATE VIEW {name} AS {body}")
            except duckdb.BinderException as e:
                if "INTEGER[]" in str(e) or "FLOAT[]" in str(e):  # archived before token arrays became binary
                    raise QueryError(f"{archive} holds step files with token arrays as Parquet lists, the layout "
                                     "before they were stored as little-endian binary: rebuild the archive from "
                                     "Kafka (move it away, then `klong sink run`) or with this version's sink") from e
                raise
        for ext in VIEW_EXTENSIONS:  # later stages add their views: register_views(con, settings)
            module = importlib.import_module(ext)
            if words is None or words & set(module.VIEW_NAMES):
                module.register_views(con, self.settings)
        lock_down(con, self.readable_dirs())
        return con

    def _relation(self, query: str) -> duckdb.DuckDBPyRelation:
        con = self.connect(query)
        try:
            statements = con.extract_statements(query)
        except duckdb.Error as e:
            raise QueryError(f"SQL does not parse: {e}") from e
        if not statements:
            raise QueryError("empty query")
        check_read_only(con, statements)
        try:
            for st in statements[:-1]:
                con.execute(st)
            return con.sql(statements[-1].query)
        except duckdb.Error as e:
            raise QueryError(_one_line(e)) from e

    def arrow(self, query: str) -> pa.Table:
        try:
            return self._relation(query).to_arrow_table()
        except duckdb.Error as e:
            raise QueryError(_one_line(e)) from e

    def sql(self, query: str) -> pl.DataFrame:
        """Runs a read-only query and returns a polars DataFrame."""
        return pl.from_arrow(self.arrow(query))

    def scalar(self, query: str):
        rows = self.arrow(query)
        return rows.column(0)[0].as_py() if rows.num_rows else None


