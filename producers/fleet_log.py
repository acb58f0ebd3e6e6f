"""What the event log says about rollouts a fleet worker was asked to run: new, ended, or where to resume.

    >>> wait_log_archived(settings, admin, probe, timeout_s=120)   # the archive holds the rollouts topic up to now
    >>> states = log_states(settings, ["0193...", "0194..."])      # rollout_id -> LogState
    >>> states[rid].ended or states[rid].resume                     # a RolloutResult, a ResumePoint, or neither
    >>> index = StartedIndex(settings); index.refresh()              # the same, cheap for rollouts never started
    >>> log_states(settings, ids, index=index)

A request can reach a worker more than once (Kafka redelivers what a lost worker had not committed), so
before running one a worker asks the log: never started (run it), ended (report its end, run nothing),
started but not ended (resume from its recorded steps: the same context, the next step_idx). The log is
read through the archive, after waiting until the sink has archived the rollouts topic up to its current
end offsets: a lost worker's last events are in Kafka (it flushed them when it gave the partition away,
or it died and sends nothing more), so "up to now" includes them.

Almost every request a worker gets is a first delivery, and a rollout that never started has no events at
all: `StartedIndex` keeps the set of rollout ids with a `rollout_started` event, read incrementally (each
refresh reads only the `rollout_started` files of flush directories it has not read yet), so those requests
cost a set lookup instead of SQL over the whole archive (whose views bind every archived file: a cost that
grows with the archive, ~0.1 s per query after a few minutes of a busy fleet). Only the rollouts the index
has seen start go through the full query.

`config_to_dict` / `config_from_dict` carry an AgentConfig in a request.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from kafka import KafkaConsumer, TopicPartition

from core.settings import Settings
from producers.agent_config import AgentConfig
from producers.sandbox import SandboxLimits
from schemas.errors import ConfigError, TransientError
from schemas.fleet import RolloutResult


def config_to_dict(config: AgentConfig) -> dict[str, Any]:
    d = dataclasses.asdict(config)
    d["allow_hosts"] = list(config.allow_hosts)
    return d


def config_from_dict(d: dict[str, Any]) -> AgentConfig:
    known = {f.name for f in dataclasses.fields(AgentConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"rollout request config has unknown keys {unknown}: a newer scheduler? upgrade the workers")
    d = dict(d)
    if isinstance(d.get("limits"), dict):
        d["limits"] = SandboxLimits(**d["limits"])
    if "allow_hosts" in d:
        d["allow_hosts"] = tuple(d["allow_hosts"])
    return AgentConfig(**d)


@dataclass
class ResumePoint:
    """Where a rollout started elsewhere continues: its recorded steps (in order) and its current iteration."""

    steps: list[dict]  # step_events rows: step_idx, role, content, tool_call, tool_call_id, pinned, token_ids...
    iteration: int
    policy_version: int
    stage: int

    @property
    def next_step_idx(self) -> int:
        return len(self.steps)

    @property
    def elapsed_s(self) -> float:
        return float(self.steps[-1]["elapsed_s"]) if self.steps else 0.0


@dataclass
class LogState:
    started: bool = False
    ended: Optional[RolloutResult] = None
    resume: Optional[ResumePoint] = None
    problem: Optional[str] = None  # the log cannot be resumed from (a gap in step_idx): end it 'error'
    next_step_idx: int = 0  # after the highest recorded step_idx
    notes: list = field(default_factory=list)


def wait_log_archived(settings: Settings, admin, probe: KafkaConsumer, *, timeout_s: float,
                      poll_s: float = 0.2) -> None:
    """Waits until the archive sink's committed offsets reach the rollouts topic's end offsets as of now.
    TransientError after `timeout_s` (no sink running?)."""
    topic, group = settings.topics.rollouts, settings.topics.sink_group
    tps = [TopicPartition(topic, p) for p in sorted(probe.partitions_for_topic(topic) or [])]
    ends = probe.end_offsets(tps)
    deadline = time.monotonic() + timeout_s
    while True:
        committed = admin.list_group_offsets(group).get(group, {})
        behind = {tp: end for tp, end in ends.items()
                  if end > 0 and (committed.get(tp) is None or committed[tp].offset < end)}
        if not behind:
            return
        if time.monotonic() >= deadline:
            raise TransientError(f"the archive sink (group {group}) has not archived {topic} up to its end within "
                                 f"{timeout_s:.0f} s ({len(behind)} partitions behind): is a sink running?")
        time.sleep(poll_s)


class StartedIndex:
    """The rollout ids that have a `rollout_started` event in the archive (the rollouts topic's flushes),
    kept up to date by `refresh()`, which reads only what it has not read before: the walk skips the flush
    directories already read without opening their manifests. A flush whose manifest lists a
    `rollout_started` file that is not there (damaged; `klong archive repair` may restore it), or whose
    manifest is unreadable, is read again at the next refresh."""

    TABLE = "rollout_started"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.ids: set[str] = set()
        self._done: set[str] = set()  # flush directories read in full
        self.files_read = 0

    def refresh(self) -> int:
        """Reads the flushes archived since the last refresh; returns how many files it read."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from store.archive import list_flushes

        n = 0
        for d in list_flushes(self.settings.archive, self.settings.topics.rollouts, skip=self._done):
            f = d.files.get(self.TABLE)
            if f is not None:
                fs = d.store.fs if d.store is not None else None
                try:
                    table = pq.read_table(str(f), columns=["rollout_id"], filesystem=fs)
                except (OSError, pa.ArrowException) as e:  # a damaged file: `klong archive verify` names it
                    raise TransientError(f"cannot read {f}: {e}") from e
                self.ids.update(table.column("rollout_id").to_pylist())
                n += 1
            listed = d.manifest is not None and f"{self.TABLE}.parquet" in (d.manifest.get("files") or {})
            if f is not None or not (listed or d.manifest_error):  # else: read it again next time
                self._done.add(str(d.path))
        self.files_read += n
        return n


def log_states(settings: Settings, rollout_ids: list[str], index: Optional[StartedIndex] = None
               ) -> dict[str, LogState]:
    """rollout_id -> LogState from the archive (call wait_log_archived first, then `index.refresh()`).
    With `index`, the ids it has not seen start are new (nothing to query)."""
    import duckdb

    from store.catalog import Catalog

    states = {rid: LogState() for rid in rollout_ids}
    if index is not None:
        rollout_ids = [rid for rid in rollout_ids if rid in index.ids]
    if not rollout_ids:
        return states
    # One connection for every query below (trusted SQL of ours: no read-only check needed); connecting
    # binds a view per archived file, so it is the expensive part.
    con = Catalog(settings).connect("rollout_started_events rollout_ended_events judge_requests snapshots "
                                    "step_events rollout_resumed_events")
    try:
        _read_states(lambda sql: con.sql(sql).to_arrow_table().to_pylist(), states, rollout_ids)
    except duckdb.Error as e:
        raise TransientError(f"cannot read the rollouts' log from the archive: {str(e).splitlines()[0]}") from e
    finally:
        con.close()
    return states


def _read_states(q, states: dict[str, LogState], rollout_ids: list[str]) -> None:
    from store.catalog import sql_str

    ids = ", ".join(sql_str(r) for r in rollout_ids)
    for r in q(f"SELECT DISTINCT rollout_id FROM rollout_started_events WHERE rollout_id IN ({ids})"):
        states[r["rollout_id"]].started = True
    ended = q(f"SELECT rollout_id, arg_min(status, produced_at) AS status, arg_min(n_steps, produced_at) AS n_steps, "
              f"arg_min(elapsed_s, produced_at) AS elapsed_s, arg_min(error, produced_at) AS error "
              f"FROM rollout_ended_events WHERE rollout_id IN ({ids}) GROUP BY rollout_id")
    if ended:
        eids = ", ".join(sql_str(r["rollout_id"]) for r in ended)
        judged = {r["rollout_id"]: r["request_id"] for r in q(
            f"SELECT rollout_id, arg_max(request_id, requested_at) AS request_id FROM judge_requests "
            f"WHERE rollout_id IN ({eids}) GROUP BY rollout_id")}
        snaps = {r["rollout_id"]: r["ref"] for r in q(
            f"SELECT rollout_id, arg_max(ref, step_idx) AS ref FROM snapshots WHERE rollout_id IN ({eids}) "
            f"GROUP BY rollout_id")}
        for r in ended:
            rid = r["rollout_id"]
            states[rid].ended = RolloutResult(rollout_id=rid, status=r["status"], n_steps=r["n_steps"],
                                              elapsed_s=r["elapsed_s"] or 0.0, error=r["error"],
                                              snapshot_ref=snaps.get(rid), judge_request_id=judged.get(rid))
    open_ = [rid for rid, s in states.items() if s.started and s.ended is None]
    if not open_:
        return
    oids = ", ".join(sql_str(r) for r in open_)
    steps: dict[str, list[dict]] = {rid: [] for rid in open_}
    for r in q(f"SELECT rollout_id, step_idx, role, content, tool_call, tool_call_id, pinned, elapsed_s, "
               f"context_start, int32s(token_ids) AS token_ids FROM step_events WHERE rollout_id IN ({oids}) "
               f"ORDER BY rollout_id, step_idx, produced_at"):
        steps[r["rollout_id"]].append(r)
    where = {r["rollout_id"]: r for r in q(
        f"SELECT rollout_id, arg_max(iteration, t) AS iteration, arg_max(policy_version, t) AS policy_version, "
        f"arg_max(stage, t) AS stage FROM (SELECT rollout_id, iteration, policy_version, stage, produced_at AS t "
        f"FROM rollout_started_events UNION ALL SELECT rollout_id, iteration, policy_version, stage, produced_at "
        f"FROM rollout_resumed_events) WHERE rollout_id IN ({oids}) GROUP BY rollout_id")}
    for rid in open_:
        rows, st = steps[rid], states[rid]
        st.next_step_idx = 1 + max((r["step_idx"] for r in rows), default=-1)
        if [r["step_idx"] for r in rows] != list(range(len(rows))):
            st.problem = (f"its recorded steps are not dense 0..n-1 (step_idx {[r['step_idx'] for r in rows][:20]}): "
                          "cannot resume")
            continue
        w = where[rid]
        st.resume = ResumePoint(rows, w["iteration"], w["policy_version"], w["stage"])
