"""SQL views of the task registry and the judge: `rubric_nodes`, `judge_queue`, `judge_leaf_scores`.

    klong sql "SELECT task_category, count(*) FROM rubric_nodes WHERE is_leaf GROUP BY ALL"
    klong sql "SELECT priority, status, count(*), quantile_cont(wait_s, 0.95) FROM judge_queue GROUP BY ALL"

- `rubric_nodes`: one row per node position of each task's latest rubric (task_id, node_id, parent_id,
  depth (root 0), weight, is_leaf, task_category, finegrained_task_category, requirements, path (its
  JSON path: unique, while ids may repeat, see `schemas.rubric`), split, content_hash). A rubric that
  went to the BlobStore (the event holds `"sha256:..."`) is read from `HOME/blobs`.
- `judge_queue`: one row per judge request (first registration of its request_id) with its outcome:
  status `pending` | `judged`, requested_at, judged_at, turnaround_s (request to result), latency_s
  (grading time), wait_s (turnaround - latency: time queued), score, valid, n_leaves,
  n_invalid_leaves, n_results (distinct result events: 1 unless something went wrong).
- `judge_leaf_scores`: one row per graded leaf of every result (request_id, leaf_id, score, valid,
  explanation).

Every view works on an empty archive (the catalog gives empty raw views their columns).
"""

from __future__ import annotations

import json

import pyarrow as pa

from schemas.claimcheck import BlobStore
from schemas.errors import ValidationError

# One row per node: flattened in Python (store.tasks._rubric_node_rows), memory linear in the tree size.
# (A recursive CTE over json_each carried the whole parent document on every child row: 1,000 flat
# leaves took 0.9 GB, 3,000 took 5.6 GB.)
RUBRIC_NODES = """
CREATE OR REPLACE VIEW rubric_nodes AS
SELECT task_id, node_id, parent_id, depth, weight, is_leaf, task_category, finegrained_task_category, requirements,
       path, split, content_hash
FROM _rubric_node_rows
"""

JUDGE_QUEUE = """
CREATE OR REPLACE VIEW judge_queue AS
WITH req AS (
    SELECT request_id, arg_min(rollout_id, requested_at) AS rollout_id, arg_min(step_idx, requested_at) AS step_idx,
           arg_min(task_id, requested_at) AS task_id, arg_min(priority, requested_at) AS priority,
           arg_min(snapshot_ref, requested_at) AS snapshot_ref, min(requested_at) AS requested_at
    FROM judge_requests GROUP BY request_id),
res AS (
    SELECT request_id, min(produced_at) AS judged_at, arg_min(score, produced_at) AS score,
           arg_min(valid, produced_at) AS valid, arg_min(latency_s, produced_at) AS latency_s,
           arg_min(len(leaf_scores), produced_at) AS n_leaves,
           arg_min(n_invalid_leaves, produced_at) AS n_invalid_leaves, arg_min(error, produced_at) AS error,
           arg_min(judge_model, produced_at) AS judge_model, count(DISTINCT event_id) AS n_results
    FROM judge_results GROUP BY request_id)
SELECT req.request_id, req.rollout_id, req.step_idx, req.task_id, req.priority, req.snapshot_ref,
       CASE WHEN res.request_id IS NULL THEN 'pending' ELSE 'judged' END AS status,
       req.requested_at, res.judged_at, epoch(res.judged_at - req.requested_at) AS turnaround_s, res.latency_s,
       greatest(epoch(res.judged_at - req.requested_at) - res.latency_s, 0) AS wait_s,
       res.score, res.valid, res.n_leaves, res.n_invalid_leaves, res.error, res.judge_model,
       coalesce(res.n_results, 0) AS n_results
FROM req LEFT JOIN res USING (request_id)
"""

JUDGE_LEAF_SCORES = """
CREATE OR REPLACE VIEW judge_leaf_scores AS
SELECT request_id, rollout_id, step_idx, task_id, judge_model, ls.id AS leaf_id, ls.score AS score,
       ls.valid AS valid, ls.explanation AS explanation, produced_at
FROM (SELECT *, unnest(leaf_scores) AS ls FROM judge_results)
"""


def judge_group(settings) -> str:
    """Consumer group of the judge worker: its committed offsets say which requests are done."""
    return f"{settings.topics.prefix}.judge"


_NODE_SCHEMA = pa.schema([("task_id", pa.string()), ("node_id", pa.string()), ("parent_id", pa.string()),
                          ("depth", pa.int32()), ("weight", pa.float64()), ("is_leaf", pa.bool_()),
                          ("task_category", pa.string()), ("finegrained_task_category", pa.string()),
                          ("requirements", pa.string()), ("path", pa.string()), ("split", pa.string()),
                          ("content_hash", pa.string())])


def _text(node: dict, key: str):
    """What SQL's `node->>'key'` gives: a string as is, other JSON values as JSON text, missing/null None."""
    v = node.get(key)
    return None if v is None else v if isinstance(v, str) else json.dumps(v)


def _weight(node: dict):
    v = node.get("weight")
    if isinstance(v, bool) or v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _rubric_node_rows(con, settings) -> pa.Table:
    """Every node of each task's latest rubric (a claim-checked rubric read from HOME/blobs), walked
    iteratively: one row per node, memory linear in the tree size."""
    latest = con.execute("""
        SELECT task_id, arg_max(rubric, produced_at), arg_max(split, produced_at), arg_max(content_hash, produced_at)
        FROM task_registered_events GROUP BY task_id ORDER BY task_id""").fetchall()
    store = BlobStore(settings.blob_dir)
    cols: dict[str, list] = {f.name: [] for f in _NODE_SCHEMA}
    for task_id, rubric, split, content_hash in latest:
        try:
            tree = json.loads(rubric) if rubric else None
            if isinstance(tree, str):  # "sha256:...": the rubric went to the BlobStore
                tree = json.loads(store.get(tree).decode())
        except (ValidationError, ValueError, RecursionError):
            continue  # missing or corrupt blob: that task has no rows in rubric_nodes
        stack = [(tree, None, 0, "$")] if isinstance(tree, dict) else []
        while stack:
            node, parent_id, depth, path = stack.pop()
            subs = node.get("sub_tasks")
            children = subs if isinstance(subs, list) else []
            for name, value in (("task_id", task_id), ("node_id", _text(node, "id")), ("parent_id", parent_id),
                                ("depth", depth), ("weight", _weight(node)), ("is_leaf", not children),
                                ("task_category", _text(node, "task_category")),
                                ("finegrained_task_category", _text(node, "finegrained_task_category")),
                                ("requirements", _text(node, "requirements")), ("path", path), ("split", split),
                                ("content_hash", content_hash)):
                cols[name].append(value)
            node_id = _text(node, "id")
            for i in range(len(children) - 1, -1, -1):
                if isinstance(children[i], dict):
                    stack.append((children[i], node_id, depth + 1, f"{path}.sub_tasks[{i}]"))
    return pa.table(cols, schema=_NODE_SCHEMA)


VIEW_NAMES = ("rubric_nodes", "judge_queue", "judge_leaf_scores")  # what register_views creates


def register_views(con, settings) -> None:
    """Creates this stage's views on a catalog connection."""
    con.register("_rubric_node_rows", _rubric_node_rows(con, settings))
    for body in (RUBRIC_NODES, JUDGE_QUEUE, JUDGE_LEAF_SCORES):
        con.execute(body)


def judge_backlog(settings) -> dict:
    """Per priority: records in Kafka past the judge group's committed offsets (not yet judged or
    skipped). On the embedded broker the end offset is the last batch's base offset + 1, so this is a
    lower bound there (exact on real Kafka)."""
    from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
    from kafka.errors import KafkaError

    from schemas.errors import BrokerError

    group = judge_group(settings)
    try:
        admin = KafkaAdminClient(**settings.kafka_config(), request_timeout_ms=5000)
        consumer = KafkaConsumer(**settings.kafka_config(), request_timeout_ms=5000)
    except KafkaError as e:
        raise BrokerError(f"cannot reach Kafka at {settings.bootstrap()}: {e}") from e
    try:
        committed = admin.list_group_offsets(group).get(group, {})
        out = {}
        for prio, topic in (("eval", settings.topics.judge_eval), ("train", settings.topics.judge_train)):
            tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
            ends = consumer.end_offsets(tps) if tps else {}
            begins = consumer.beginning_offsets(tps) if tps else {}
            out[prio] = sum(max(0, ends[tp] - (committed[tp].offset if tp in committed else begins[tp])) for tp in tps)
        return out
    finally:
        consumer.close()
        admin.close()


def judge_status(settings) -> dict:
    """What `klong judge status` prints: queue depth per priority (Kafka and archive), latency
    percentiles, invalid-leaf rate."""
    from schemas.errors import BrokerError, ConfigError
    from store.catalog import Catalog

    rows = Catalog(settings).arrow("""
        SELECT priority, count(*) AS requested, count(*) FILTER (WHERE status = 'judged') AS judged,
               count(*) FILTER (WHERE status = 'pending') AS pending,
               count(*) FILTER (WHERE status = 'judged' AND NOT valid) AS invalid_results,
               quantile_cont(latency_s, 0.5) AS latency_p50, quantile_cont(latency_s, 0.95) AS latency_p95,
               quantile_cont(latency_s, 0.99) AS latency_p99,
               quantile_cont(wait_s, 0.5) AS wait_p50, quantile_cont(wait_s, 0.95) AS wait_p95,
               quantile_cont(turnaround_s, 0.95) AS turnaround_p95,
               sum(n_leaves)::BIGINT AS leaves, sum(n_invalid_leaves)::BIGINT AS invalid_leaves
        FROM judge_queue GROUP BY priority ORDER BY priority""").to_pylist()
    report: dict = {"archive": {r.pop("priority"): r for r in rows}}
    leaves = sum(r["leaves"] or 0 for r in rows)
    report["invalid_leaf_rate"] = (sum(r["invalid_leaves"] or 0 for r in rows) / leaves) if leaves else None
    try:
        report["kafka_backlog"] = judge_backlog(settings)
    except (BrokerError, ConfigError) as e:
        report["kafka_backlog"], report["kafka_error"] = None, str(e)
    return report
