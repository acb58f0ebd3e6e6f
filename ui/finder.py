"""Finding things in the archive for `klong ui`: full-text search over steps, and a group's rollouts side by side.

    hits = search(catalog, limits, "Traceback", rollout=None, role=None, page=0, index=StepIndex(settings))
    # -> {"hits": [...], "more": bool}
    g = group(catalog, "g-17")      # rollouts (score, length, ...), aligned steps, where they diverge

Search is a case-insensitive substring match over every step's content and tool-call arguments
(`contains(lower(content), needle)`, the whole content: also the middles a page shows collapsed), newest
rollouts first, PAGE hits a page. With a word index (`store.search_index`) only the steps it names as
candidates are read, in that order, and matched exactly, until the page is full: a rare word reads a few
steps, a common one the newest rollouts' steps, text in no step none. Without one (an archive on S3, or
`index=None`) one scan of `steps` answers, under the viewer's query limits (ui.query) like the SQL box.
Both give the same hits (a property test holds them to it); the text is a query parameter, never SQL. A hit
carries a snippet around its first match, split into (before, match, after) for the page to mark.
"""

from __future__ import annotations

import time
from typing import Optional

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.errors import ConfigError
from store.archive import archived_files
from store.catalog import Catalog
from store.search_index import Snapshot, StepIndex
from ui.query import BoundedQuery, Limits, QueryStopped
from ui.viewer import NotFound, _rows

PAGE = 50  # hits per page
CONTEXT = 100  # characters of a snippet before the match (after: 2 x CONTEXT)
GROUP_STEPS = 400  # steps per rollout shown side by side (heads only); the rollout page has them all
HEAD = 280  # characters of a step shown in the side-by-side view
ROLES = ("system", "user", "assistant", "tool")
FIRST_BATCH = 256  # candidates matched exactly at once (then twice as many each round, until the page is full)

MATCH = "(contains(lower(content), $needle) OR contains(lower(tool_arguments), $needle))"
# The snippet window of a matching row of `{source}` (columns `{key}`, content, tool_arguments).
SNIPPET = f"""
    SELECT {{key}}, CASE WHEN at_c > 0 THEN 'content' ELSE 'tool call' END AS field,
           CASE WHEN at_c > 0 THEN substring(content, w0 + 1, {3 * CONTEXT + 40} + length($needle))
                ELSE substring(tool_arguments, w0 + 1, {3 * CONTEXT + 40} + length($needle)) END AS txt,
           w0, CASE WHEN at_c > 0 THEN length(content) ELSE length(tool_arguments) END AS n_chars
    FROM (SELECT *, greatest(CASE WHEN at_c > 0 THEN at_c ELSE at_a END - {CONTEXT + 20}, 1) - 1 AS w0
          FROM (SELECT {{key}}, content, tool_arguments, strpos(lower(content), $needle) AS at_c,
                       strpos(lower(tool_arguments), $needle) AS at_a
                FROM {{source}} WHERE {{where}}))"""
STARTED = ("SELECT rollout_id, arg_min(task_id, produced_at) AS task_id, arg_min(group_id, produced_at) AS group_id, "
           "min(produced_at) AS started_at FROM rollout_started_events GROUP BY ALL")


def _collect(catalog: Catalog, query: str, limits: Limits, running: Optional[set] = None,
             params: Optional[dict] = None) -> list[dict]:
    q = BoundedQuery(catalog, query, limits, running, params).start()
    try:
        return [row for batch in q.batches() for row in batch.to_pylist()]
    finally:
        q.cancel()
        q.join()


def search(catalog: Catalog, limits: Limits, text: str, rollout: Optional[str] = None, role: Optional[str] = None,
           page: int = 0, running: Optional[set] = None, index: Optional[StepIndex] = None) -> dict:
    """Steps whose content or tool-call arguments contain `text` (any case); `rollout`: only that rollout's.
    `index`: look the candidates up there (None, or disabled: scan every step)."""
    text = text.strip()
    if not text:
        return {"hits": [], "more": False}
    if len(text) > 500:
        raise ConfigError(f"search text of {len(text)} characters: at most 500")
    if role is not None and role not in ROLES:
        raise ConfigError(f"unknown role {role!r}: choose one of {', '.join(ROLES)}")
    if page < 0:
        raise ConfigError(f"page {page} must be >= 0")
    needle = lower(text)
    if index is not None and index.enabled:
        rows = _indexed(catalog, limits, index, needle, rollout, role, page, running)
    else:
        rows = _scanned(catalog, limits, needle, rollout, role, page, running)
    seen: set = set()
    rows = [r for r in rows if (k := (r["rollout_id"], r["step_idx"])) not in seen and not seen.add(k)]  # a re-sent step
    hits = [_snippet(r, text) for r in rows[:PAGE]]
    return {"hits": hits, "more": len(rows) > PAGE, "page": page}


def lower(text: str) -> str:
    """`text` lowered by DuckDB, as the match lowers the steps' text (Python's str.lower differs: "İ" -> "i̇")."""
    con = duckdb.connect(config={"enable_external_access": False, "autoinstall_known_extensions": False})
    try:
        return con.execute("SELECT lower($t)", {"t": text}).fetchall()[0][0]
    finally:
        con.close()


def _scanned(catalog: Catalog, limits: Limits, needle: str, rollout: Optional[str], role: Optional[str], page: int,
             running: Optional[set]) -> list[dict]:
    """The page's rows (PAGE + 1 at most) by one scan of `steps`."""
    params: dict = {"needle": needle}
    where = [MATCH]
    if rollout is not None:
        where.append("rollout_id = $rollout")
        params["rollout"] = rollout
    if role is not None:
        where.append("role = $role")
        params["role"] = role
    # Two passes: the page's hits by id (one scan of the text, nothing carried: a common word matches most
    # steps), then a window of text around the match for those hits only.
    rows = _collect(catalog, f"""
        SELECT s.rollout_id, s.step_idx, s.role, s.tool_name, s.event_id, r.task_id, r.group_id
        FROM steps s LEFT JOIN ({STARTED}) r USING (rollout_id)
        WHERE {" AND ".join(where)}
        ORDER BY r.started_at DESC NULLS LAST, s.rollout_id, s.step_idx, s.produced_at, s.event_id
        LIMIT {PAGE + 1} OFFSET {PAGE * page}""", limits, running, params)
    if rows:
        found = _collect(catalog, SNIPPET.format(key="event_id", source="steps",
                                                 where="event_id IN (SELECT unnest($ids::VARCHAR[]))"),
                         limits, running, {"needle": needle, "ids": [r["event_id"] for r in rows]})
        texts = {t.pop("event_id"): t for t in found}
        for r in rows:
            r.update(texts.get(r.pop("event_id"), {"field": "content", "txt": "", "w0": 0, "n_chars": 0}))
    return rows


_started: dict[str, tuple] = {}  # data home -> (rollout_started files, {rollout_id: (task, group)}, table)


def _rollouts_started(catalog: Catalog, limits: Limits, running: Optional[set]) -> tuple[tuple, dict, pa.Table]:
    """(state, rollout_id -> (task_id, group_id), table rollout_id/started_at), read again when the archive's
    rollout_started files change."""
    import os

    files = archived_files(catalog.settings.archive).get("rollout_started", [])
    try:
        state = tuple((str(f), os.stat(f).st_mtime_ns) for f in files)
    except FileNotFoundError:  # quarantined while listed: read it again next time too
        state = None
    home = str(catalog.settings.home)
    hit = _started.get(home)
    if hit is None or hit[0] != state or state is None:
        rows = _collect(catalog, STARTED, limits, running)
        table = pa.table({"rollout_id": pa.array([r["rollout_id"] for r in rows], pa.string()),
                          "started_at": pa.array([r["started_at"] for r in rows], pa.timestamp("us", tz="UTC"))})
        hit = _started[home] = (state, {r["rollout_id"]: (r["task_id"], r["group_id"]) for r in rows}, table)
    return hit


def _indexed(catalog: Catalog, limits: Limits, index: StepIndex, needle: str, rollout: Optional[str],
             role: Optional[str], page: int, running: Optional[set]) -> list[dict]:
    """The page's rows (PAGE + 1 at most): the index's candidates in the search's order, matched exactly in
    growing batches until the page is full."""
    t0 = time.monotonic()
    snap = index.snapshot()
    if snap.pending.any():
        index.update_async()  # new flushes: scanned now, indexed for the next search
    state, meta, started = _rollouts_started(catalog, limits, running)
    order = snap.order(started, state)
    mask = snap.candidates(needle)
    keep = snap.winner.copy() if mask is None else mask & snap.winner
    for column, value in (("rollout_id", rollout), ("role", role)):
        if value is not None:
            keep &= pc.fill_null(pc.equal(snap.rows.column(column), value), False).to_numpy(zero_copy_only=False)
    candidates = order[keep[order]]
    want = PAGE * (page + 1) + 1
    found: list[dict] = []
    con = duckdb.connect(config={"enable_external_access": False, "autoinstall_known_extensions": False})
    try:
        pos, n = 0, FIRST_BATCH
        while pos < len(candidates) and len(found) < want:
            if time.monotonic() - t0 > limits.timeout_s:
                raise QueryStopped("timeout", f"the search stopped at the query time limit of {limits.timeout_s:g} s "
                                              "(klong ui --sql-timeout); search within one rollout")
            gids = candidates[pos:pos + n]
            pos, n = pos + n, 2 * n
            found += _confirm(con, snap, gids, needle, meta)
    finally:
        con.close()
    return found[PAGE * page:want]


def _confirm(con: duckdb.DuckDBPyConnection, snap: Snapshot, gids: np.ndarray, needle: str, meta: dict) -> list[dict]:
    """The rows `gids` that hold the needle (the exact match of the scan), in that order, with their snippets."""
    texts = snap.texts(gids).append_column("pos", pa.array(np.arange(len(gids), dtype=np.int64)))
    con.register("b", texts)
    try:
        matched = con.sql(SNIPPET.format(key="pos", source="b", where=MATCH) + " ORDER BY pos",
                          params={"needle": needle}).to_arrow_table().to_pylist()
    finally:
        con.unregister("b")
    rows = snap.rows
    names = texts.column("tool_name")
    out = []
    for m in matched:
        p = m.pop("pos")
        g = int(gids[p])
        rid = rows.column("rollout_id")[g].as_py()
        task, grp = meta.get(rid, (None, None))
        out.append({"rollout_id": rid, "step_idx": rows.column("step_idx")[g].as_py(),
                    "role": rows.column("role")[g].as_py(), "tool_name": names[p].as_py(), "task_id": task,
                    "group_id": grp, **m})
    return out


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
