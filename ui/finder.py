"""Finding things in the archive for `klong ui`: full-text search over steps, and a group's rollouts side by side.

    hits = search(catalog, limits, "Traceback", rollout=None, role=None, page=0)   # -> {"hits": [...], "more": bool}
    g = group(catalog, "g-17")      # rollouts (score, length, ...), aligned steps, where they diverge

Search is a case-insensitive substring match over every step's content and tool-call arguments
(DuckDB `contains(lower(...))` over the `steps` view: no index to build or keep fresh, and the whole
content is searched, also the middles a page shows collapsed), newest rollouts first, PAGE hits a page.
It runs under the viewer's query limits (ui.query), like the SQL box. A hit carries a snippet
around its first match, split into (before, match, after) for the page to mark.
"""

from __future__ import annotations

from typing import Optional

from schemas.errors import ConfigError
from store.catalog import Catalog, sql_str
from ui.query import BoundedQuery, Limits
from ui.viewer import NotFound, _rows

PAGE = 50  # hits per page
CONTEXT = 100  # characters of a snippet before the match (after: 2 x CONTEXT)
GROUP_STEPS = 400  # steps per rollout shown side by side (heads only); the rollout page has them all
HEAD = 280  # characters of a step shown in the side-by-side view
ROLES = ("system", "user", "assistant", "tool")


def _collect(catalog: Catalog, query: str, limits: Limits, running: Optional[set] = None) -> list[dict]:
    q = BoundedQuery(catalog, query, limits, running).start()
    try:
        return [row for batch in q.batches() for row in batch.to_pylist()]
    finally:
        q.cancel()
        q.join()


def search(catalog: Catalog, limits: Limits, text: str, rollout: Optional[str] = None, role: Optional[str] = None,
           page: int = 0, running: Optional[set] = None) -> dict:
    """Steps whose content or tool-call arguments contain `text` (any case); `rollout`: only that rollout's."""
    text = text.strip()
    if not text:
        return {"hits": [], "more": False}
    if len(text) > 500:
        raise ConfigError(f"search text of {len(text)} characters: at most 500")
    if role is not None and role not in ROLES:
        raise ConfigError(f"unknown role {role!r}: choose one of {', '.join(ROLES)}")
    if page < 0:
        raise ConfigError(f"page {page} must be >= 0")
    needle = sql_str(text.lower())
    where = [f"(contains(lower(content), {needle}) OR contains(lower(tool_arguments), {needle}))"]
    if rollout is not None:
        where.append(f"rollout_id = {sql_str(rollout)}")
    if role is not None:
        where.append(f"role = {sql_str(role)}")
    # Two passes: the page's hits by id (one scan of the text, nothing carried: a common word matches most
    # steps), then a window of text around the match for those hits only.
    match = " AND ".join(where)
    rows = _collect(catalog, f"""
        SELECT s.rollout_id, s.step_idx, s.role, s.tool_name, s.event_id, r.task_id, r.group_id
        FROM steps s LEFT JOIN (SELECT rollout_id, arg_min(task_id, produced_at) AS task_id,
                                       arg_min(group_id, produced_at) AS group_id, min(produced_at) AS started_at
                                FROM rollout_started_events GROUP BY ALL) r USING (rollout_id)
        WHERE {match}
        ORDER BY r.started_at DESC NULLS LAST, s.rollout_id, s.step_idx, s.produced_at
        LIMIT {PAGE + 1} OFFSET {PAGE * page}""", limits, running)
    seen: set = set()
    rows = [r for r in rows if (k := (r["rollout_id"], r["step_idx"])) not in seen and not seen.add(k)]  # a re-sent step
    if rows:
        ids = ", ".join(sql_str(r["event_id"]) for r in rows)
        texts = {t.pop("event_id"): t for t in _collect(catalog, f"""
            SELECT event_id, CASE WHEN at_c > 0 THEN 'content' ELSE 'tool call' END AS field,
                   CASE WHEN at_c > 0 THEN substring(content, w0 + 1, {3 * CONTEXT + 40} + length({needle}))
                        ELSE substring(tool_arguments, w0 + 1, {3 * CONTEXT + 40} + length({needle})) END AS txt,
                   w0, CASE WHEN at_c > 0 THEN length(content) ELSE length(tool_arguments) END AS n_chars
            FROM (SELECT *, greatest(CASE WHEN at_c > 0 THEN at_c ELSE at_a END - {CONTEXT + 20}, 1) - 1 AS w0
                  FROM (SELECT event_id, content, tool_arguments, strpos(lower(content), {needle}) AS at_c,
                               strpos(lower(tool_arguments), {needle}) AS at_a
                        FROM steps WHERE event_id IN ({ids})))""", limits, running)}
        for r in rows:
            r.update(texts.get(r.pop("event_id"), {"field": "content", "txt": "", "w0": 0, "n_chars": 0}))
    hits = [_snippet(r, text) for r in rows[:PAGE]]
    return {"hits": hits, "more": len(rows) > PAGE, "page": page}


def _snippet(row: dict, text: str) -> dict:
    """The row with `before`, `match`, `after` around the first case-insensitive match of its text window
    `txt` (`w0`: where the window starts in the whole text, `n_chars`: the whole text's length)."""
    txt = row.pop("txt") or ""
    w0 = row.pop("w0", 0) or 0
    n_chars = row.pop("n_chars", None) or w0 + len(txt)
    at = txt.lower().find(text.lower())
    if at < 0:  # lower() changed a length before the match (rare scripts): show the head
        at, n = 0, 0
    else:
        n = len(text)
    start = max(0, at - CONTEXT)
    end = at + n + 2 * CONTEXT
    row.update(before=("…" if w0 + start > 0 else "") + txt[start:at], match=txt[at:at + n],
               after=txt[at + n:end] + ("…" if w0 + min(end, len(txt)) < n_chars else ""))
    return row


def group(catalog: Catalog, group_id: str) -> dict:
    """A group's rollouts side by side: {"rollouts": [...best first], "rows": [{step_idx, cells: [...]}],
    "common": n (steps 0..n-1 identical in every rollout), "diverge": {rollout_id: first step that differs
    from the best rollout}}."""
    with catalog.connect("rollouts steps") as con:
        rollouts = _rows(con, "SELECT rollout_id, task_id, stage, iteration, status, final_score, n_turns, n_steps, "
                              "n_tokens, elapsed_s, policy_version FROM rollouts WHERE group_id = ? "
                              "ORDER BY final_score DESC NULLS LAST, n_turns, rollout_id", (group_id,))
        if not rollouts:
            raise NotFound(f"group {group_id!r} has no rollouts in the archive")
        ids = [r["rollout_id"] for r in rollouts]
        steps = _rows(con, f"""
            SELECT rollout_id, step_idx, role, tool_name, left(tool_arguments, {HEAD}) AS args,
                   left(content, {HEAD}) AS head, length(content) AS n_chars, n_tokens,
                   md5(concat_ws(chr(31), role, content, tool_name, tool_arguments)) AS h
            FROM steps WHERE rollout_id IN (SELECT unnest(?::VARCHAR[])) AND step_idx < {GROUP_STEPS}
            QUALIFY row_number() OVER (PARTITION BY rollout_id, step_idx ORDER BY produced_at, event_id) = 1
            ORDER BY step_idx""", (ids,))
    by = {rid: {} for rid in ids}
    for s in steps:
        by[s["rollout_id"]][s["step_idx"]] = s
    n = max((max(d) + 1 for d in by.values() if d), default=0)
    common = 0
    while common < n and len({(by[r].get(common) or {}).get("h") for r in ids}) == 1 and by[ids[0]].get(common):
        common += 1
    best = by[ids[0]]
    diverge = {}
    for rid in ids[1:]:
        mine = by[rid]
        i = 0
        while i < n and mine.get(i) and best.get(i) and mine[i]["h"] == best[i]["h"]:
            i += 1
        diverge[rid] = i
    rows = [{"step_idx": i, "cells": [by[r].get(i) for r in ids],
             "differs": len({(by[r].get(i) or {}).get("h") for r in ids}) > 1} for i in range(common, n)]
    return {"group_id": group_id, "rollouts": rollouts, "rows": rows, "common": common, "diverge": diverge,
            "truncated": n >= GROUP_STEPS}
