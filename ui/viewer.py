"""Read-only queries behind `klong ui` (ui): the rollouts list, one rollout as a conversation, judge
results as rubric trees, blacklist hits. Everything comes from the catalog's views (store.catalog); a
dataset version's overlay on a rollout is in ui.overlay.

    v = Viewer(Catalog(settings))
    v.rollouts(RolloutFilter(task="fre", status="finished", sort="final_score"))   # -> list of dicts
    page = v.rollout(rollout_id)          # meta, steps (head/tail of long contents), resumes, judge trees, hits
    v.step(rollout_id, 17)                # one step's whole content (what "expand" fetches)

A page is one catalog connection (the views are created once per connection, which is most of the cost
on a large archive) and a few small SQL statements with parameters. Contents longer than
`COLLAPSE_CHARS` (assistant messages: `ASSISTANT_CHARS`) come as head + tail with their full length;
the rest is fetched when expanded, so a 700-turn rollout's page stays small.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from consumers.turns import build_turns
from schemas.errors import ConfigError, TerminalError, ValidationError
from store.catalog import Catalog, sql_str

# Longer contents are shown as head ... tail until expanded: observations (tool outputs, prompts) beyond
# COLLAPSE_CHARS, assistant messages beyond ASSISTANT_CHARS (the policy's own words are read more often).
COLLAPSE_CHARS, ASSISTANT_CHARS = 600, 2000
HEAD_CHARS, TAIL_CHARS = 300, 200
ROLLOUT_COLUMNS = ("rollout_id", "task_id", "stage", "iteration", "last_iteration", "status", "final_score", "n_turns",
                   "n_steps", "n_tokens", "elapsed_s", "n_judged", "n_resumes", "policy_version", "last_policy_version",
                   "group_id", "model", "started_at")
PAGE_ROWS = 50  # rollouts per page of the list: 50 rows of compact columns fit a 1,400 px window
STATUSES = ("running", "finished", "timeout", "error", "aborted")
# Views a rollout page reads: the catalog creates only the extension views a connection names.
PAGE_VIEWS = "rollouts steps rollout_resumes judge_results judge_leaf_scores rubric_nodes blacklist_hits samples datasets"


class NotFound(TerminalError):
    """The rollout (or step, or dataset version) asked for is not in the archive."""


@dataclass(frozen=True)
class RolloutFilter:
    """Filters of the rollouts list. `iteration` matches a rollout live in that iteration (started in it, carried
    into it or ended in it: iteration <= i <= last_iteration)."""

    task: Optional[str] = None
    group: Optional[str] = None
    stage: Optional[int] = None
    iteration: Optional[int] = None
    status: Optional[str] = None
    min_score: Optional[float] = None
    max_score: Optional[float] = None
    sort: str = "started_at"
    desc: bool = True
    limit: int = PAGE_ROWS
    page: int = 0  # rows [page * limit, (page + 1) * limit) of the sorted list

    def check(self) -> None:
        if self.sort not in ROLLOUT_COLUMNS:
            raise ConfigError(f"cannot sort by {self.sort!r}: choose one of {', '.join(ROLLOUT_COLUMNS)}")
        if self.status is not None and self.status not in STATUSES:
            raise ConfigError(f"unknown status {self.status!r}: choose one of {', '.join(STATUSES)}")
        if not 1 <= self.limit <= 100_000:
            raise ConfigError(f"limit {self.limit} must be in [1, 100000]")
        if not 0 <= self.page <= 10_000_000:
            raise ConfigError(f"page {self.page} must be >= 0")


def _rows(con, query: str, params: tuple = ()) -> list[dict]:
    cur = con.execute(query, list(params))
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


class Viewer:
    def __init__(self, catalog: Catalog):
        self.catalog = catalog

    def rollouts(self, f: RolloutFilter) -> dict:
        """{"rows": [...], "choices": {task, stage, iteration, status: sorted distinct values}, "total": n}."""
        f.check()
        where, params = [], []
        for column, value in (("task_id", f.task), ("group_id", f.group), ("stage", f.stage), ("status", f.status)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if f.iteration is not None:
            where.append("? BETWEEN iteration AND last_iteration")
            params.append(f.iteration)
        if f.min_score is not None:
            where.append("final_score >= ?")
            params.append(f.min_score)
        if f.max_score is not None:
            where.append("final_score <= ?")
            params.append(f.max_score)
        cond = ("WHERE " + " AND ".join(where)) if where else ""
        order = f"{f.sort} {'DESC' if f.desc else 'ASC'} NULLS LAST, rollout_id"
        with self.catalog.connect("rollouts") as con:
            con.execute(f"CREATE TEMP TABLE _r AS SELECT {', '.join(ROLLOUT_COLUMNS)} FROM rollouts")
            rows = _rows(con, f"SELECT * FROM _r {cond} ORDER BY {order} LIMIT {f.limit} OFFSET {f.page * f.limit}",
                         tuple(params))
            total = con.execute(f"SELECT count(*) FROM _r {cond}", params).fetchone()[0]
            choices = {c: [r[0] for r in con.execute(f"SELECT DISTINCT v FROM (SELECT {col} AS v FROM _r) "
                                                     "WHERE v IS NOT NULL ORDER BY 1").fetchall()]
                       for c, col in (("task", "task_id"), ("stage", "stage"),
                                      ("iteration", "unnest([iteration, last_iteration])"), ("status", "status"))}
        return {"rows": rows, "total": total, "choices": choices}

    def rollout(self, rollout_id: str) -> dict:
        """Everything the conversation page shows about one rollout (NotFound if it is not archived)."""
        with self.catalog.connect(PAGE_VIEWS) as con:
            meta = _rows(con, "SELECT * FROM rollouts WHERE rollout_id = ?", (rollout_id,))
            if not meta:
                raise NotFound(f"rollout {rollout_id!r} is not in the archive")
            steps, resumes, hits = _conversation(con, rollout_id)
            judged = _rows(con, "SELECT request_id, step_idx, judge_model, score, valid, n_invalid_leaves, error, "
                                "latency_s, produced_at FROM judge_results WHERE rollout_id = ? "
                                "ORDER BY step_idx, produced_at", (rollout_id,))
            trees = self._trees(con, rollout_id, meta[0]["task_id"]) if judged else {}
            versions = _rows(con, "SELECT d.dataset, d.version, d.kind, d.created_at, s.n_windows FROM datasets d "
                                  "LEFT JOIN (SELECT dataset, version, count(*) AS n_windows FROM samples "
                                  "WHERE rollout_id = ? GROUP BY ALL) s USING (dataset, version) "
                                  "ORDER BY s.n_windows IS NULL, d.dataset, d.version DESC", (rollout_id,))
            near = con.execute("""
                SELECT prev, next FROM (
                    SELECT rollout_id, lag(rollout_id) OVER w AS prev, lead(rollout_id) OVER w AS next
                    FROM (SELECT rollout_id, min(produced_at) AS t FROM rollout_started_events GROUP BY ALL)
                    WINDOW w AS (ORDER BY t DESC, rollout_id)) WHERE rollout_id = ?""", [rollout_id]).fetchone()
        for j in judged:
            j["tree"] = trees.get(j["request_id"])
        return {"meta": meta[0], "steps": steps, "resumes": resumes, "judge": judged, "blacklist_hits": hits,
                "versions": versions, "prev": near[0] if near else None, "next": near[1] if near else None}

    def conversation(self, rollout_id: str) -> list[dict]:
        """The rollout's steps alone (annotated as on the page), on a lighter connection: the page's later steps."""
        with self.catalog.connect("steps rollout_resumes blacklist_hits") as con:
            steps, _, _ = _conversation(con, rollout_id)
        if not steps:
            raise NotFound(f"rollout {rollout_id!r} has no steps in the archive")
        return steps

    def step(self, rollout_id: str, step_idx: int) -> dict:
        """One step with its whole content (NotFound if absent)."""
        rows = self.catalog.arrow(
            "SELECT step_idx, role, content, tool_name, tool_arguments, n_tokens FROM steps "
            f"WHERE rollout_id = {sql_str(rollout_id)} AND step_idx = {int(step_idx)} ORDER BY produced_at LIMIT 1"
        ).to_pylist()
        if not rows:
            raise NotFound(f"rollout {rollout_id!r} has no step {step_idx}")
        return rows[0]

    def windows_of(self, rollout_id: str, step_idx: int) -> list[dict]:
        """Every dataset window of the rollout (dataset, version, window_idx, first_step, last_step, holds: the
        window's input holds the step, as prefix or span), newest versions first."""
        rows = self.catalog.arrow(
            "SELECT dataset || '@' || version AS ref, window_idx, first_step, last_step FROM samples "
            f"WHERE rollout_id = {sql_str(rollout_id)} ORDER BY dataset, version DESC, window_idx").to_pylist()
        first = {}
        for r in rows:
            first[r["ref"]] = min(first.get(r["ref"], r["first_step"]), r["first_step"])
        for r in rows:  # steps before a version's first window start are its prefix: in every window
            r["holds"] = step_idx < first[r["ref"]] or r["first_step"] <= step_idx <= r["last_step"]
        return rows

    def blacklist_hits(self, limit: int = 1000) -> list[dict]:
        return self.catalog.arrow('SELECT rollout_id, step_idx, task_id, role, url, "where", matched FROM '
                                  f"blacklist_hits ORDER BY rollout_id, step_idx LIMIT {int(limit)}").to_pylist()

    def _trees(self, con, rollout_id: str, task_id: str) -> dict[str, dict]:
        """request_id -> the task's (latest) rubric tree with that result's leaf scores and explanations."""
        nodes = _rows(con, "SELECT node_id, weight, is_leaf, requirements, task_category, path FROM rubric_nodes "
                           "WHERE task_id = ?", (task_id,))
        if not nodes:
            return {}
        leaves: dict[str, dict[str, dict]] = {}
        scores = dict(con.execute("SELECT request_id, arg_max(score, produced_at) FROM judge_results WHERE rollout_id = ? "
                                  "GROUP BY ALL", [rollout_id]).fetchall())
        request_ids = list(scores)
        for r in _rows(con, "SELECT request_id, leaf_id, score, valid, explanation FROM judge_leaf_scores "
                            "WHERE rollout_id = ?", (rollout_id,)):
            leaves.setdefault(r["request_id"], {})[r["leaf_id"]] = r
        return {rid: rubric_tree(nodes, leaves.get(rid, {}), scores.get(rid)) for rid in request_ids}


def _conversation(con, rollout_id: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(annotated steps, carry-overs, blacklist hits) of one rollout; long contents as head + tail."""
    steps = _rows(con, f"""
        WITH s AS (SELECT *, length(content) > CASE WHEN role = 'assistant' THEN {ASSISTANT_CHARS}
                                                     ELSE {COLLAPSE_CHARS} END AS collapsed
                   FROM steps WHERE rollout_id = ?)
        SELECT step_idx, role, CASE WHEN collapsed THEN left(content, {HEAD_CHARS}) ELSE content END AS head,
               CASE WHEN collapsed THEN right(content, {TAIL_CHARS}) END AS tail,
               length(content) AS n_chars, tool_name, tool_arguments, tool_call_id, n_tokens, pinned,
               elapsed_s, policy_version, claim_checked
        FROM s
        QUALIFY row_number() OVER (PARTITION BY step_idx ORDER BY produced_at) = 1
        ORDER BY step_idx""", (rollout_id,))
    resumes = _rows(con, "SELECT iteration, policy_version, stage, next_step_idx, produced_at "
                         "FROM rollout_resumes WHERE rollout_id = ? ORDER BY produced_at", (rollout_id,))
    hits = _rows(con, 'SELECT step_idx, role, url, "where", matched FROM blacklist_hits '
                      "WHERE rollout_id = ? ORDER BY step_idx", (rollout_id,))
    return annotate(steps, resumes, hits), resumes, hits


def rubric_tree(nodes: list[dict], leaf_scores: dict[str, dict], judge_score: Optional[float] = None) -> dict:
    """The rubric as nested dicts (id, requirements, weight, is_leaf, category, score, graded, valid, explanation,
    children) from `rubric_nodes` rows and one result's leaf scores.

    A leaf the result holds scores what the judge gave it (an invalid grade counts 0, as in the judge); a leaf
    it does not hold (a rubric that changed since, a leaf left out) is *not graded*: score None, never 0, and
    left out of its parents' weighted means, so the tree re-derives the judge's Q from the leaves the judge
    graded. The root shows the judge's own score (`judge_score`); `derived` keeps the tree's value, and
    `mismatch` says when the two differ (the rubric changed in a way the tree cannot undo)."""
    by_path = {n["path"]: {"id": n["node_id"], "requirements": n["requirements"], "weight": n["weight"],
                           "is_leaf": n["is_leaf"], "category": n["task_category"], "children": []} for n in nodes}

    def index(path: str) -> int:
        return int(path.rsplit("[", 1)[1].rstrip("]"))

    for path in sorted((p for p in by_path if p != "$"), key=lambda p: (p.count("."), index(p))):
        by_path[path.rsplit(".sub_tasks[", 1)[0]]["children"].append(by_path[path])

    root = by_path["$"]
    order, k = [root], 0
    while k < len(order):  # breadth first; scored children before parents below, without recursion
        order.extend(order[k]["children"])
        k += 1
    for n in reversed(order):
        n["valid"] = n["leaf_score"] = n["explanation"] = None
        if not n["children"]:
            graded = leaf_scores.get(n["id"])
            n["graded"] = graded is not None
            if graded is not None:
                n["valid"], n["leaf_score"], n["explanation"] = bool(graded["valid"]), graded["score"], graded["explanation"]
            n["score"] = None if graded is None else float(graded["score"] or 0.0) if graded["valid"] else 0.0
            continue
        parts = [(float(c["weight"] or 0), c["score"]) for c in n["children"] if c["score"] is not None]
        total = sum(w for w, _ in parts)
        n["graded"] = bool(parts)
        n["score"] = None if not parts else 0.0 if total <= 0 else sum(w * x for w, x in parts) / total
    derived = root["score"]
    root["derived"] = derived
    if judge_score is not None:
        root["mismatch"] = derived is None or abs(derived - judge_score) > 5e-4
        root["score"] = judge_score
    return root


def annotate(steps: list[dict], resumes: list[dict], hits: list[dict]) -> list[dict]:
    """Adds to each step: `prefix` (in the pinned prefix), `prefix_end` (its last step), `turn` (its turn number,
    None in the prefix and for trailing observations), `dt` (seconds since the previous step), `pv_change` (a
    policy version other than the previous step's), `resumed` (the carry-over that starts at this step, if
    any), `hits` (blacklist URLs)."""
    if not steps:
        return steps
    roles = [s["role"] for s in steps]
    pinned = np.array([bool(s["pinned"]) for s in steps])
    n_tok = np.array([s["n_tokens"] or 0 for s in steps], dtype=np.int64)
    turn_of: dict[int, int] = {}
    try:
        t = build_turns(roles, pinned, n_tok)
        prefix = t.prefix_len
        for k, (a, b) in enumerate(zip(t.start_step.tolist(), t.end_step.tolist())):
            for i in range(a, b + 1):
                turn_of[i] = k
    except ValidationError:  # steps not dense (still arriving): show them without turns
        prefix = 1 + int(np.flatnonzero(pinned).max()) if pinned.any() else 0
    resumed = {r["next_step_idx"]: r for r in resumes}
    hit_urls: dict[int, list[str]] = {}
    for h in hits:
        hit_urls.setdefault(h["step_idx"], []).append(h["url"])
    prev_t, prev_pv = None, steps[0]["policy_version"]
    for pos, s in enumerate(steps):
        i = s["step_idx"]
        s["prefix"] = pos < prefix
        s["prefix_end"] = pos == prefix - 1
        s["turn"] = turn_of.get(pos)
        s["dt"] = None if prev_t is None or s["elapsed_s"] is None else s["elapsed_s"] - prev_t
        s["pv_change"] = pos > 0 and s["policy_version"] != prev_pv
        s["resumed"] = resumed.get(i)
        s["hits"] = hit_urls.get(i, [])
        prev_t = s["elapsed_s"] if s["elapsed_s"] is not None else prev_t
        prev_pv = s["policy_version"]
    return steps


def as_jsonable(value: Any) -> Any:
    """Dicts/lists of query results with datetimes as ISO strings (for JSON responses)."""
    import datetime as dt

    if isinstance(value, dict):
        return {k: as_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_jsonable(v) for v in value]
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    return value
