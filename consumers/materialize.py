"""Archive -> dataset version: steps -> turns -> sub-trajectories -> rewards -> advantages -> Parquet.

    klong dataset build web-rl --kind rl --config rl.yaml max_tokens=32768     # prints web-rl@N
    >>> build_version(settings.home, "web-rl", "rl", {"max_tokens": 32768})    # -> BuildOutcome

The splitting, reward and advantage rules are `consumers.split`, `consumers.rewards` and
`consumers.advantages` (DESIGN.md "Semantics the tests hold the code to"); this module decides which
events enter and moves the tokens. It reads an explicit *input set* (a list of archive flush
directories, optionally restricted to Kafka offset ranges) so a version can be rebuilt from exactly
the events it was built from (`store.replay`). Two passes, both through DuckDB over the Parquet files:

1. plan (small columns only: ids, roles, pins, `len(token_ids)`): every decision is made here, per
   rollout with numpy, then advantages over the whole dataset. Memory ~ O(steps), no token values.
2. tokens: rollouts in batches of ~`batch_tokens`, ordered by where they sit in the archive so a
   batch reads few files; the steps the kept windows use are fetched (a join on file + row number),
   laid out flat per rollout and streamed into `tokens.parquet` (`store.datasets`).

Which events enter (each exclusion counted in the manifest's `drops`, by reason, never an error):
- a rollout needs `rollout_started`; its task must be registered and every registration of it must
  say split = train (`eval_task`, `unknown_task`); asking for an eval task in `tasks=` is an error;
- no `rollout_ended` (or resumed after its last end): PENDING, left out and listed in `pending`;
- status not in `statuses` (default finished, timeout: error/aborted runs are not trained on);
- stage / iteration / tasks filters (the rollout's stage and iteration after its last resume);
- events archived twice (same event_id) are read once; two different events for one
  (rollout_id, step_idx) keep the first by produced_at (then Kafka offset), counted `duplicate_step`;
- steps are sorted by step_idx, so arrival order does not matter; a gap in step_idx (or fewer steps
  than `rollout_ended.n_steps`) leaves the rollout out (`step_gap`);
- `consumers.split` drops (prefix_too_long, turn_too_long, trailing_observations, no_turns);
- rl: windows without a valid judge result (`unrewarded`), judge results for rollouts never started
  (`judge_unknown_rollout`); several results for one step: the latest valid (produced_at, offset) wins;
- a step of the rollout holds a URL of its task's blacklist (`store.blacklist`): `blacklisted`;
- `max_staleness`: windows whose policy_version (the oldest policy that acted in the window) is more
  than that many versions behind the trainer (`trainer_policy_version`, default: the newest
  policy_version in the dataset) are left out (`stale`);
- `drop_constant_groups`: groups whose windows all have the same Q (`constant_group`).
Group baselines (rl): a group also holds the rewarded windows of its rollouts that ended in an *earlier*
iteration than `iteration` selects. A rollout carried over into iteration i ends there, while its siblings
(same group_id) ended in i - 1: the `iteration=[i]` build reads the siblings' steps and judge results from
the same input set and puts their Q in the group's mean (baseline only: not trained, not stored); rollouts
of later iterations never join, so rebuilding iteration i - 1 gives the advantages its first build gave. The Q comes from the
log (judge results), not from the earlier dataset version, so a version stays a pure function of its input
set (replay gives the same hash). The manifest counts `groups`, `single_member_groups` (all windows from
one rollout: A = 0 under reward_mode=final), `single_member_windows` and `baseline_windows`.
Steps without token_ids (text-only imports) are tokenized with `tokenizer` (default "bytes").
"""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping, Optional, get_args

import duckdb
import numpy as np
import pyarrow as pa

from consumers.advantages import group_advantages
from consumers.rewards import RewardMode, assign_rewards
from consumers.chat import ChatTokenizer, TemplateError
from consumers.split import DROP_UNITS, PrefixLoss, SplitConfig, split_rollout
from consumers.tokenize import load_tokenizer
from schemas.arrow import SCHEMAS, as_list_array
from schemas.errors import ConfigError
from schemas.events import SCHEMA_VERSION, RolloutStatus
from store import datasets as ds
from store.archive import list_flushes
from store.blacklist import blacklisted_rollouts

KINDS = ("sft", "rl")
INPUT_TYPES = ("step", "rollout_started", "rollout_resumed", "rollout_ended", "judge_result", "task_registered")
UNITS = {**DROP_UNITS, "step_gap": "rollouts", "no_rollout_started": "rollouts", "eval_task": "rollouts",
         "unknown_task": "rollouts", "stage_filter": "rollouts", "iteration_filter": "rollouts",
         "task_filter": "rollouts", "unrewarded": "windows", "stale": "windows", "constant_group": "windows",
         "duplicate_event": "events", "duplicate_step": "steps", "judge_unknown_rollout": "judge results",
         "blacklisted": "rollouts"}
BATCH_TOKENS = 64_000_000  # tokens fetched per pass-2 batch (~0.5 GB of ids + logprobs in memory)


# ---- config -------------------------------------------------------------------------------------


def _ints(key: str, v: Any, lo: int) -> Optional[tuple[int, ...]]:
    if v is None:
        return None
    vals = v if isinstance(v, (list, tuple)) else [v]
    if not vals or not all(isinstance(x, int) and not isinstance(x, bool) and x >= lo for x in vals):
        raise ConfigError(f"{key} must be an integer >= {lo} or a list of them, got {v!r}")
    return tuple(sorted(set(vals)))


@dataclass(frozen=True)
class DatasetConfig:
    max_tokens: int = 32768  # L_max: prefix + window tokens
    overlap_turns: int = 2  # O: turns shared by consecutive windows
    loss_on_overlap: bool = True
    prefix_loss: PrefixLoss = "first"
    reward_mode: RewardMode = "final"
    std_normalize: bool = False
    drop_constant_groups: bool = False
    max_staleness: Optional[int] = None  # policy versions; None: keep every window
    trainer_policy_version: Optional[int] = None  # staleness is measured from it (None: newest in the dataset)
    tokenizer: str = "bytes"  # for text-only steps: "bytes", a tokenizer.json, a model directory or NAME (HOME/models)
    stage: Optional[tuple[int, ...]] = None  # only rollouts of these stages (None: all)
    iteration: Optional[tuple[int, ...]] = None
    tasks: Optional[tuple[str, ...]] = None  # only these (train) tasks
    statuses: tuple[str, ...] = ("finished", "timeout")

    def __post_init__(self) -> None:
        self.split_config()  # validates max_tokens, overlap_turns, loss_on_overlap, prefix_loss
        if self.reward_mode not in get_args(RewardMode):
            raise ConfigError(f"reward_mode must be one of {get_args(RewardMode)}, got {self.reward_mode!r}")
        for key in ("std_normalize", "drop_constant_groups"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if self.max_staleness is not None and (not isinstance(self.max_staleness, int) or isinstance(
                self.max_staleness, bool) or self.max_staleness < 0):
            raise ConfigError(f"max_staleness must be an integer >= 0 (or null), got {self.max_staleness!r}")
        tpv = self.trainer_policy_version
        if tpv is not None and (not isinstance(tpv, int) or isinstance(tpv, bool) or tpv < 0):
            raise ConfigError(f"trainer_policy_version must be an integer >= 0 (or null), got {tpv!r}")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise ConfigError("tokenizer must be 'bytes', a tokenizer.json, a model directory or a NAME under "
                              f"HOME/models, got {self.tokenizer!r}")
        object.__setattr__(self, "stage", _ints("stage", self.stage, 1))
        object.__setattr__(self, "iteration", _ints("iteration", self.iteration, 0))
        tasks = self.tasks
        if tasks is not None:
            tasks = [tasks] if isinstance(tasks, str) else tasks
            if not tasks or not all(isinstance(t, str) and t for t in tasks):
                raise ConfigError(f"tasks must be a task_id or a list of them, got {self.tasks!r}")
            object.__setattr__(self, "tasks", tuple(sorted(set(tasks))))
        statuses = [self.statuses] if isinstance(self.statuses, str) else self.statuses
        bad = [s for s in statuses or [None] if s not in get_args(RolloutStatus)]
        if bad:
            raise ConfigError(f"statuses must be a non-empty list from {get_args(RolloutStatus)}, got {self.statuses!r}")
        object.__setattr__(self, "statuses", tuple(sorted(set(statuses))))

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> "DatasetConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ConfigError(f"unknown dataset config key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        return cls(**config)

    def split_config(self) -> SplitConfig:
        return SplitConfig(self.max_tokens, self.overlap_turns, self.loss_on_overlap, self.prefix_loss)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# ---- input set ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputSet:
    """Which archived events a build reads: flush directories, optionally only some Kafka offsets."""

    archive: Path
    flushes: tuple[str, ...]  # archive-relative: topic/topic_id/topic+partition+first+last, sorted
    ranges: tuple[tuple[str, int, int, int], ...] = ()  # (topic, partition, first, last): only these offsets

    @classmethod
    def scan(cls, archive: Path) -> "InputSet":
        """Every flush directory of the archive that holds an event type a dataset reads."""
        keep = [f for f in list_flushes(archive) if any((f.path / f"{t}.parquet").exists() for t in INPUT_TYPES)]
        return cls(archive, tuple(sorted(str(f.path.relative_to(archive)) for f in keep)))

    def files(self, etype: str) -> list[str]:
        return [str(p) for f in self.flushes if (p := self.archive / f / f"{etype}.parquet").exists()]

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


def _sql_list(paths: list[str]) -> str:
    return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"


def _connect(inputs: InputSet) -> duckdb.DuckDBPyConnection:
    """DuckDB views `raw_<type>` (rows as archived, within the input set) and `<type>` (one row per event_id)."""
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": True})
    where = inputs.predicate()
    for etype in INPUT_TYPES:
        files = inputs.files(etype)
        if files:
            src = f"read_parquet({_sql_list(files)}, filename=true, file_row_number=true, union_by_name=true)"
        else:
            schema = SCHEMAS[etype].append(pa.field("filename", pa.string())).append(pa.field("file_row_number", pa.int64()))
            con.register(f"_empty_{etype}", pa.table({f.name: pa.array([], f.type) for f in schema}))
            src = f"_empty_{etype}"
        con.execute(f"CREATE VIEW raw_{etype} AS SELECT * FROM {src} {where}")
        if etype != "step":  # steps: deduplicated in the plan query, without their token arrays
            con.execute(f"CREATE VIEW {etype} AS SELECT DISTINCT ON (event_id) * FROM raw_{etype} "
                        "ORDER BY event_id, kafka_topic, kafka_partition, kafka_offset")
    return con


def _arrow(con: duckdb.DuckDBPyConnection, query: str) -> pa.Table:
    return con.sql(query).to_arrow_table()


def _scalar(con: duckdb.DuckDBPyConnection, query: str) -> Any:
    return con.execute(query).fetchall()[0][0]


# ---- pass 1: plan -------------------------------------------------------------------------------

STEPS_SQL = """
CREATE TEMP TABLE step_meta AS
WITH d AS (
    SELECT DISTINCT ON (event_id) event_id, rollout_id, step_idx, role, pinned, policy_version, produced_at,
           kafka_topic, kafka_partition, kafka_offset, octet_length(token_ids) // 4 AS n_tokens, filename, file_row_number,
           {context_start} AS context_start
    FROM raw_step ORDER BY event_id, kafka_topic, kafka_partition, kafka_offset)
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


@dataclass
class _Rollout:
    info: dict  # rollout_id, task_id, group_id, stage, iteration, status
    lo: int  # its steps are rows [lo, hi) of the step table, in step_idx order
    hi: int
    prefix_len: int = 0
    windows: list = field(default_factory=list)  # kept consumers.split.Window objects
    same_ctx: list = field(default_factory=list)  # per window of the split (window_idx): bool [n_spans]
    prefix_same_ctx: bool = False  # every prefix step was recorded with its generation context
    used: Optional[np.ndarray] = None  # bool [n_steps]: steps stored (prefix + the kept windows' spans)


@dataclass
class Plan:
    steps: dict  # numpy columns of the chosen step rows (sorted by rollout_id, step_idx) + "files"
    rollouts: list  # _Rollout with at least one kept window, in storage order
    samples: dict  # per kept window (same order): q, advantage, policy_version, staleness
    drops: Counter
    pending: list
    counts: dict


def _column(con: duckdb.DuckDBPyConnection, view: str, name: str, default: str) -> str:
    """`name`, or `default` when no archived file of the view has that (newer) column."""
    return name if name in {r[0] for r in con.execute(f"DESCRIBE {view}").fetchall()} else default


def _step_table(con: duckdb.DuckDBPyConnection, tokenizer, drops: Counter) -> dict:
    con.execute(STEPS_SQL.format(context_start=_column(con, "raw_step", "context_start", "NULL::BIGINT")))
    drops["duplicate_step"] += _scalar(con, "SELECT count(*) FROM step_meta WHERE copy > 1")
    t = _arrow(con, "SELECT rollout_id, step_idx, role = 'assistant' AS is_asst, pinned, policy_version, n_tokens, "
                    "coalesce(context_start, -1) AS context_start, filename, file_row_number FROM step_meta "
                    "WHERE copy = 1 ORDER BY rollout_id, step_idx")
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
    }
    if text_only.any():  # text-only steps: their token count comes from the tokenizer
        idx = np.flatnonzero(text_only)
        if isinstance(tokenizer, ChatTokenizer):  # whole rollouts rendered with the template, kept for pass 2
            steps["rendered"] = _render_rollouts(con, steps, idx, tokenizer)
        steps["n_tokens"][idx] = [len(a) for a in _tokenize(con, steps, idx, tokenizer)]
    return steps


def _render_rollouts(con, steps: dict, idx: np.ndarray, chat: ChatTokenizer) -> dict[int, np.ndarray]:
    """Step row -> ids: each text-only rollout's steps as chat messages (role, content) rendered with the model
    directory's template and split per message (`consumers.chat`). Tools are not in the events: an import
    with `--tokenizer MODEL_DIR` (which renders the row's `tools`) is exact; this is the fallback."""
    contents = _contents(con, steps, idx)
    t = _arrow(con, "SELECT rollout_id, step_idx, role FROM step_meta WHERE copy = 1 ORDER BY rollout_id, step_idx")
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
        if n_steps[r] != len(rows):
            raise ConfigError(f"rollout {r} has recorded token ids and text-only steps: a chat template cannot "
                              "render only some of its messages (re-import it with --tokenizer MODEL_DIR)")
        messages = [{"role": role[i], "content": contents[k + n]} for n, i in enumerate(rows)]
        try:
            spans = chat.message_spans(messages)
        except TemplateError as e:
            raise ConfigError(f"rollout {r}: {e}") from e
        out.update(zip(rows.tolist(), spans))
        k = j
    return out


def _contents(con, steps: dict, idx: np.ndarray) -> list[str]:
    want = pa.table({"file": pa.array([steps["files"][f] for f in steps["file"][idx]], pa.string()),
                     "row": pa.array(steps["row"][idx]), "pos": pa.array(np.arange(len(idx)))})
    con.register("_want", want)
    t = _arrow(con, "SELECT w.pos, s.content FROM raw_step s JOIN _want w "
                    "ON s.filename = w.file AND s.file_row_number = w.row ORDER BY w.pos")
    con.unregister("_want")
    return t.column("content").to_pylist()


def _tokenize(con, steps: dict, idx: np.ndarray, tokenizer) -> list[np.ndarray]:
    """Text-only step rows `idx` tokenized, in the order of idx (rendered with the chat template when the
    tokenizer is a model directory's, else each content encoded alone)."""
    if "rendered" in steps:
        return [steps["rendered"][i] for i in idx.tolist()]
    return tokenizer.encode_batch(_contents(con, steps, idx))


def _task_splits(con) -> dict[str, bool]:
    """task_id -> True when every registration of it says split = train (once eval, always eval)."""
    t = _arrow(con, "SELECT task_id, bool_and(split = 'train') AS train FROM task_registered GROUP BY task_id")
    return dict(zip(t.column("task_id").to_pylist(), t.column("train").to_pylist()))


def _judge_results(con) -> dict[str, dict[str, np.ndarray]]:
    t = _arrow(con, "SELECT rollout_id, step_idx, score, valid, row_number() OVER (PARTITION BY rollout_id "
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


def plan(con: duckdb.DuckDBPyConnection, kind: str, config: DatasetConfig, tokenizer) -> Plan:
    """Pass 1: every decision (which rollouts, windows, rewards, advantages, which steps to store)."""
    drops: Counter = Counter()
    for etype in INPUT_TYPES:
        drops["duplicate_event"] += _scalar(con, f"SELECT count(*) - count(DISTINCT event_id) FROM raw_{etype}")
    splits = _task_splits(con)
    for t in config.tasks or ():
        if not splits.get(t, True):
            raise ConfigError(f"tasks: {t!r} is an eval task; eval tasks never enter a training dataset")
        if t not in splits:
            raise ConfigError(f"tasks: {t!r} is not a registered task (see `klong sql \"SELECT * FROM tasks\"`)")
    steps = _step_table(con, tokenizer, drops)
    rinfo = _arrow(con, ROLLOUTS_SQL.format(tokenizer=_column(con, "rollout_started", "tokenizer", "''"))).to_pylist()
    judges = _judge_results(con)

    # Step rows of each rollout: the table is sorted by rollout_id, so boundaries are where it changes.
    rid, n = steps["rollout_id"], len(steps["rollout_id"])
    starts = np.flatnonzero(np.concatenate([[True], rid[1:] != rid[:-1]])) if n else np.zeros(0, np.int64)
    bounds = {rid[s]: (s, e) for s, e in zip(starts.tolist(), np.append(starts[1:], n).tolist())}
    started = {r["rollout_id"] for r in rinfo}
    drops["no_rollout_started"] += len(set(bounds) - started)
    drops["judge_unknown_rollout"] += sum(len(j["step_idx"]) for r, j in judges.items() if r not in started)

    # Rollouts that touched a URL their task forbids never enter a dataset (store.blacklist).
    blacklisted = blacklisted_rollouts(
        con, "SELECT rollout_id, step_idx, role, content, tool_call.arguments AS tool_arguments FROM raw_step",
        "SELECT rollout_id, arg_min(task_id, produced_at) AS task_id FROM rollout_started GROUP BY rollout_id",
        "task_registered")
    pending, rollouts, wins, sib_rollouts, sib_wins = [], [], [], [], []
    any_iteration = replace(config, iteration=None)
    for info in rinfo:
        counted_elsewhere = _excluded(info, splits, config)  # eval/unknown task or a filter: _split_one counts it
        if info["rollout_id"] in blacklisted and not counted_elsewhere:
            drops["blacklisted"] += 1
        elif info["pending"] and not counted_elsewhere:
            pending.append(info["rollout_id"])
        else:
            _split_one(info, bounds, steps, judges, splits, kind, config, drops, rollouts, wins)
            if (kind == "rl" and counted_elsewhere == "iteration_filter" and not info["pending"]
                    and info["iteration"] < max(config.iteration)
                    and info["rollout_id"] not in blacklisted):  # a sibling from an earlier iteration: baseline only
                _split_one(info, bounds, steps, judges, splits, kind, any_iteration, Counter(), sib_rollouts, sib_wins)
    keep, adv, stale, group_counts = _choose(wins, rollouts, kind, config, drops, sib_wins, sib_rollouts)

    for i in np.flatnonzero(keep):
        rollouts[wins[i].rollout].windows.append(i)
    stored = [r for r in rollouts if r.windows]
    token_source = _one_tokenizer(stored, steps, tokenizer)
    for r in stored:  # steps to store: the prefix and every step a kept window reads
        r.used = np.zeros(r.hi - r.lo, bool)
        r.used[:r.prefix_len] = True
        for i in r.windows:
            r.used[wins[i].window.spans[:, 0]] = True
    # Storage order: by the archive file holding the rollout's first step (a pass-2 batch reads few files).
    stored.sort(key=lambda r: (int(steps["file"][r.lo]) if r.hi > r.lo else 0, r.info["rollout_id"]))
    order = np.array([i for r in stored for i in r.windows], np.int64)
    for r in stored:
        r.windows = [wins[i].window for i in r.windows]
    samples = {"q": np.array([w.q for w in wins], np.float64)[order] if len(order) else np.zeros(0),
               "advantage": adv[order], "policy_version": np.array([w.policy_version for w in wins], np.int64)[order]
               if len(order) else np.zeros(0, np.int64), "staleness": stale[order]}
    newest = max((w.newest for w in wins), default=None)
    counts = {"steps_read": int(n), "rollouts_seen": len(rinfo), "windows_split": len(wins),
              "newest_policy_version": newest, **group_counts, "token_ids_from": token_source}
    return Plan(steps, stored, samples, +drops, sorted(pending), counts)


def _one_tokenizer(stored: list, steps: dict, tokenizer) -> str:
    """The one tokenizer fingerprint the dataset's ids come from, or a ConfigError naming two rollouts whose
    ids come from different ones. A rollout's recorded ids count with its rollout_started.tokenizer ("":
    unknown, an older recorder, not checkable); its text-only steps with the build's `tokenizer`."""
    seen: dict[str, str] = {}
    for r in stored:
        text = steps["text_only"][r.lo:r.hi][r.used]
        if (~text).any() and r.info.get("tokenizer"):
            seen.setdefault(r.info["tokenizer"], r.info["rollout_id"])
        if text.any():
            seen.setdefault(tokenizer.fingerprint, r.info["rollout_id"])
    if len(seen) > 1:
        (a, ra), (b, rb) = list(seen.items())[:2]
        raise ConfigError(f"the dataset would mix token ids of different tokenizers: rollout {ra} has ids from {a}, "
                          f"rollout {rb} from {b} (text-only steps count as tokenizer={tokenizer.fingerprint}); build "
                          "from one tokenizer's rollouts (tasks=, iteration=) or set tokenizer= to the model directory "
                          "they were recorded with")
    return next(iter(seen), "")


@dataclass(frozen=True)
class _Win:
    rollout: int  # index into the rollouts list
    window: Any  # consumers.split.Window
    q: float  # NaN: unrewarded (or sft)
    policy_version: int  # the oldest policy that acted in the window
    newest: int  # the newest policy that acted in its rollout


def _split_one(info: dict, bounds: dict, steps: dict, judges: dict, splits: dict, kind: str,
               config: DatasetConfig, drops: Counter, rollouts: list, wins: list) -> None:
    """One finished rollout -> its windows (appended to `wins`), or a drop reason counted."""
    reason = _excluded(info, splits, config)
    if not reason and info["status"] not in config.statuses:
        reason = f"status_{info['status']}"
    lo, hi = bounds.get(info["rollout_id"], (0, 0))
    idx = steps["step_idx"][lo:hi]
    if not reason and ((hi > lo and idx[-1] != hi - lo - 1) or (info["n_steps"] or 0) > hi - lo):
        reason = "step_gap"  # steps are unique and sorted: dense iff the last one is count - 1
    if reason:
        drops[reason] += 1
        return
    is_asst = steps["is_asst"][lo:hi]
    res = split_rollout(is_asst, steps["pinned"][lo:hi], steps["n_tokens"][lo:hi], config.split_config())
    drops.update(res.drops)
    if not res.windows:
        return
    q = np.full(len(res.windows), np.nan)
    if kind == "rl":
        j = judges.get(info["rollout_id"], {"step_idx": [], "score": [], "valid": [], "order": []})
        q, rdrops = assign_rewards([w.last_step for w in res.windows], j, config.reward_mode)
        drops.update(rdrops)
    pv = steps["policy_version"][lo:hi]
    newest = int(pv[is_asst].max())
    for w, qw in zip(res.windows, q.tolist()):
        body = w.spans[:, 0]
        wins.append(_Win(len(rollouts), w, qw, int(pv[body[is_asst[body]]].min()), newest))
    ctx = steps["context_start"][lo:hi]
    rollouts.append(_Rollout(info, lo, hi, res.prefix_len,
                             same_ctx=[same_context(w, ctx, steps["n_tokens"][lo:hi]) for w in res.windows],
                             prefix_same_ctx=bool(np.all(ctx[:res.prefix_len] >= 0))))


def same_context(w, context_start: np.ndarray, n_tokens: np.ndarray) -> np.ndarray:
    """bool [n_spans]: the window gives span k's step exactly the context it was generated in. The runner
    records `context_start` c (it was given steps [0, P) ++ [c, step)); the window gives prefix ++ its spans,
    so they agree when c is the window's first step and every span up to k is its whole, consecutive step
    (no truncated observation, no dropped turn in between)."""
    sp = w.spans
    k = np.arange(len(sp))
    whole = (sp[:, 0] == w.first_step + k) & (sp[:, 1] == 0) & (sp[:, 2] == n_tokens[sp[:, 0]])
    return np.logical_and.accumulate(whole) & (context_start[sp[:, 0]] == w.first_step) & (not w.obs_truncated)


def _choose(wins: list, rollouts: list, kind: str, config: DatasetConfig, drops: Counter, sib_wins: list = (),
            sib_rollouts: list = ()) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Which windows stay (rewarded, fresh enough, in a group with signal) -> (keep, advantage, staleness, group
    counts). `sib_wins`: rewarded windows of rollouts the iteration filter leaves out (siblings of a carried-over
    rollout that ended in another iteration): in their group's baseline, never trained."""
    keep = np.array([kind == "sft" or not np.isnan(w.q) for w in wins], bool)
    newest = config.trainer_policy_version
    if newest is None:
        newest = max((w.newest for w in wins), default=0)
    stale = newest - np.array([w.policy_version for w in wins], np.int64)
    if config.max_staleness is not None:
        too_old = keep & (stale > config.max_staleness)
        drops["stale"] += int(too_old.sum())
        keep &= ~too_old
    adv, counts = np.full(len(wins), np.nan), {}
    if kind == "rl" and keep.any():
        k = np.flatnonzero(keep)
        info = [rollouts[wins[i].rollout].info for i in k] + [sib_rollouts[w.rollout].info for w in sib_wins]
        a = group_advantages([x["group_id"] for x in info], [x["stage"] for x in info],
                             np.array([wins[i].q for i in k] + [w.q for w in sib_wins]),
                             std_normalize=config.std_normalize, drop_constant_groups=config.drop_constant_groups,
                             baseline_only=np.arange(len(info)) >= len(k), members=[x["rollout_id"] for x in info])
        adv[k] = a.advantage[:len(k)]
        keep[k] = a.keep[:len(k)]
        drops.update(a.drops)
        counts = a.counts
    return keep, adv, stale, counts


def _excluded(info: dict, splits: dict[str, bool], config: DatasetConfig) -> Optional[str]:
    train = splits.get(info["task_id"])
    if train is None:
        return "unknown_task"
    if not train:
        return "eval_task"
    if config.tasks is not None and info["task_id"] not in config.tasks:
        return "task_filter"
    if config.stage is not None and info["stage"] not in config.stage:
        return "stage_filter"
    if config.iteration is not None and info["iteration"] not in config.iteration:
        return "iteration_filter"
    return None


# ---- pass 2: tokens -----------------------------------------------------------------------------

FETCH_SQL = """
SELECT c.pos, s.token_ids {lp} FROM read_parquet({files}, filename=true, file_row_number=true) s
JOIN _chosen c ON s.filename = c.file AND s.file_row_number = c.row ORDER BY c.pos"""


def _fetch_batch(con, p: Plan, batch: list[_Rollout], kind: str, tokenizer, counts: Counter) -> pa.Table:
    st = p.steps
    sel = np.concatenate([np.arange(r.lo, r.hi)[r.used] for r in batch])  # step rows, storage order
    lens = st["n_tokens"][sel]
    dst = np.concatenate([[0], np.cumsum(lens)])  # where each selected step's tokens go
    total = int(dst[-1])
    has_ids = ~st["text_only"][sel]
    rows = sel[has_ids]
    files = sorted(set(st["file"][rows].tolist()))
    tokens = np.empty(total, np.int32)
    lp = np.full(total, np.nan, np.float32) if kind == "rl" else None
    if len(rows):
        con.register("_chosen", pa.table({"file": pa.array([st["files"][f] for f in st["file"][rows]], pa.string()),
                                          "row": pa.array(st["row"][rows]), "pos": pa.array(np.arange(len(rows)))}))
        t = _arrow(con, FETCH_SQL.format(lp=", s.logprobs" if lp is not None else "",
                                         files=_sql_list([st["files"][f] for f in files])))
        con.unregister("_chosen")
        ids = as_list_array(t.column("token_ids"), "int32")
        got = ids.value_lengths().to_numpy(zero_copy_only=False)
        if len(got) != len(rows) or not np.array_equal(got, lens[has_ids]):
            raise ds.DatasetError("archive files changed while the dataset was built (token counts differ)")
        if len(rows) == len(sel):  # no text-only step: the fetched values are the layout
            tokens = ids.flatten().to_numpy()
        else:
            tokens[np.repeat(has_ids, lens)] = ids.flatten().to_numpy()
        if lp is not None:
            lps = as_list_array(t.column("logprobs"), "float32")
            valid = np.zeros(len(sel), bool)
            valid[has_ids] = lps.is_valid().to_numpy(zero_copy_only=False)
            lp[np.repeat(valid, lens)] = lps.flatten().to_numpy(zero_copy_only=False)
    text = np.flatnonzero(~has_ids)
    for k, arr in zip(text.tolist(), _tokenize(con, st, sel[text], tokenizer) if len(text) else []):
        tokens[dst[k]:dst[k + 1]] = arr
    if lp is not None:  # an assistant step without logprobs (text-only import): NaN in the reader, counted
        first = dst[:-1][st["is_asst"][sel] & (lens > 0)]
        counts["assistant_steps_without_logprobs"] += int(np.isnan(lp[first]).sum())

    # One row per rollout: flat tokens, per-step offsets (unused steps are empty), roles.
    n_used = np.cumsum([int(r.used.sum()) for r in batch])
    tok_off = dst[np.concatenate([[0], n_used])].astype(np.int32)
    step_off, asst_l = [], []
    for r in batch:
        n_tok = np.where(r.used, st["n_tokens"][r.lo:r.hi], 0)
        step_off.append(np.concatenate([[0], np.cumsum(n_tok)]))
        asst_l.append(st["is_asst"][r.lo:r.hi])
    info = [r.info for r in batch]
    cols = {
        "rollout_id": [i["rollout_id"] for i in info], "group_id": [i["group_id"] for i in info],
        "task_id": [i["task_id"] for i in info], "status": [i["status"] for i in info],
        "stage": [i["stage"] for i in info], "iteration": [i["iteration"] for i in info],
        "prefix_len": [r.prefix_len for r in batch],
        "prefix_tokens": [int(st["n_tokens"][r.lo:r.lo + r.prefix_len].sum()) for r in batch],
        "step_offsets": _list(step_off, pa.int64()), "step_assistant": _list(asst_l, pa.bool_()),
        "token_ids": pa.ListArray.from_arrays(pa.array(tok_off), pa.array(tokens)),
    }
    if lp is not None:
        cols["logprobs"] = pa.ListArray.from_arrays(pa.array(tok_off), pa.array(lp, mask=np.isnan(lp)))
    return pa.table(cols)


def _list(parts: list[np.ndarray], typ: pa.DataType) -> pa.Array:
    off = np.concatenate([[0], np.cumsum([len(x) for x in parts])]).astype(np.int32)
    vals = np.concatenate(parts) if parts else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(off), pa.array(vals, typ))


def _samples_table(p: Plan, kind: str) -> pa.Table:
    rows = [(r.info, w) for r in p.rollouts for w in r.windows]
    same = [r.same_ctx[w.window_idx] for r in p.rollouts for w in r.windows]
    prefix_same = [r.prefix_same_ctx for r in p.rollouts for _ in r.windows]
    spans = [w.spans for _, w in rows]
    g = lambda f: [getattr(w, f) for _, w in rows]  # noqa: E731
    rl = kind == "rl"
    return pa.table({
        "rollout_id": [i["rollout_id"] for i, _ in rows], "group_id": [i["group_id"] for i, _ in rows],
        "task_id": [i["task_id"] for i, _ in rows], "stage": [i["stage"] for i, _ in rows],
        "iteration": [i["iteration"] for i, _ in rows], "window_idx": g("window_idx"), "first_turn": g("first_turn"),
        "last_turn": g("last_turn"), "n_turns": g("n_turns"), "first_step": g("first_step"), "last_step": g("last_step"),
        "n_tokens": g("n_tokens"), "n_loss_tokens": g("n_loss_tokens"), "obs_truncated": g("obs_truncated"),
        "prefix_loss": g("prefix_loss"),
        "q": pa.array(p.samples["q"] if rl else np.zeros(len(rows)), mask=None if rl else np.ones(len(rows), bool)),
        "advantage": pa.array(p.samples["advantage"] if rl else np.zeros(len(rows)), mask=None if rl else np.ones(len(rows), bool)),
        "policy_version": p.samples["policy_version"], "staleness": p.samples["staleness"],
        **{name: _list([s[:, c] for s in spans], typ) for c, (name, typ) in enumerate(
            [("span_step", pa.int32()), ("span_start", pa.int32()), ("span_end", pa.int32()), ("span_loss", pa.bool_())])},
        "span_same_ctx": _list(same, pa.bool_()), "prefix_same_ctx": pa.array(prefix_same, pa.bool_()),
    })


# ---- build --------------------------------------------------------------------------------------


def materialize(inputs: InputSet, kind: str, config: DatasetConfig, out_dir: Path,
                batch_tokens: int = BATCH_TOKENS) -> dict:
    """Builds a dataset from `inputs` into `out_dir` (tokens.parquet, samples.parquet); returns the manifest
    (without name/version: `store.datasets.publish` adds them)."""
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
    t0 = time.monotonic()
    tokenizer = load_tokenizer(config.tokenizer)
    con = _connect(inputs)
    try:
        p = plan(con, kind, config, tokenizer)
        counts: Counter = Counter()
        writer = ds.TokensWriter(out_dir / ds.TOKENS, with_logprobs=kind == "rl")
        # Batch k is encoded, digested and written on a second thread while DuckDB fetches batch k + 1
        # (both release the GIL); at most one batch waits, so memory stays ~2 batches.
        with ThreadPoolExecutor(1, thread_name_prefix="klong-dataset-writer") as pool:
            pending, batch, size = None, [], 0
            for r in p.rollouts + [None]:
                if r is not None:
                    batch.append(r)
                    size += int(p.steps["n_tokens"][r.lo:r.hi][r.used].sum())
                if batch and (r is None or size >= batch_tokens):
                    table = _fetch_batch(con, p, batch, kind, tokenizer, counts)
                    if pending:
                        pending.result()
                    pending, batch, size = pool.submit(writer.write, table), [], 0
            if pending:
                pending.result()
        tokens_digest = writer.close()
    finally:
        con.close()
    samples = _samples_table(p, kind)
    samples_digest = ds.write_samples(out_dir / ds.SAMPLES, samples)
    manifest = {
        "format": ds.FORMAT, "schema_version": SCHEMA_VERSION, "kind": kind, "config": config.to_dict(),
        "tokenizer": tokenizer.fingerprint,
        "counts": {**p.counts, **counts, "rollouts": writer.rows, "samples": samples.num_rows,
                   "tokens": writer.tokens, "loss_tokens": int(np.sum(samples.column("n_loss_tokens")))},
        "drops": {k: {"count": int(v), "unit": UNITS.get(k, "rollouts")} for k, v in sorted(p.drops.items())},
        "pending": p.pending,
        "input": {"flushes": list(inputs.flushes), "watermark": inputs.watermark(),
                  **({"ranges": [list(r) for r in inputs.ranges]} if inputs.ranges else {})},
        "tables": {"tokens": {"file": ds.TOKENS, "rows": writer.rows, "digest": tokens_digest},
                   "samples": {"file": ds.SAMPLES, "rows": samples.num_rows, "digest": samples_digest}},
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "build_seconds": round(time.monotonic() - t0, 3),
    }
    manifest["content_hash"] = ds.content_hash(manifest, tokens_digest, samples_digest)
    return manifest


@dataclass(frozen=True)
class BuildOutcome:
    ref: str  # NAME@N
    manifest: dict
    existing: bool  # True: nothing new since this version, it was returned as is


def build_version(home: Path | str, name: str, kind: str, config: Mapping[str, Any] | DatasetConfig,
                  batch_tokens: int = BATCH_TOKENS) -> BuildOutcome:
    """Builds NAME@N+1 from the whole archive of `home`, or returns the existing version built from the same
    input set with the same kind, config and tokenizer."""
    ds.check_name(name)
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
    cfg = config if isinstance(config, DatasetConfig) else DatasetConfig.from_mapping(config)
    home = Path(home)
    if cfg.tokenizer != "bytes" and not Path(cfg.tokenizer).exists() and (home / "models" / cfg.tokenizer).is_dir():
        cfg = replace(cfg, tokenizer=str((home / "models" / cfg.tokenizer).resolve()))  # tokenizer=NAME: HOME/models
    inputs = InputSet.scan(home / "archive")
    if not inputs.flushes:
        raise ConfigError(f"the archive in {home} holds no rollout events: nothing to build "
                          "(produce events and run `klong sink run --until-idle` first)")
    fingerprint = load_tokenizer(cfg.tokenizer).fingerprint
    for m in reversed(ds.all_manifests(home)):
        if (m["name"] == name and m["kind"] == kind and m["config"] == cfg.to_dict() and m["tokenizer"] == fingerprint
                and m["input"]["flushes"] == list(inputs.flushes) and not m["input"].get("ranges")):
            return BuildOutcome(m["ref"], m, existing=True)
    out = ds.new_build_dir(home)
    try:
        manifest = materialize(inputs, kind, cfg, out, batch_tokens)
        version = ds.publish(home, name, out, manifest)
    except BaseException:
        ds.discard(out)
        raise
    return BuildOutcome(f"{name}@{version}", manifest, existing=False)
