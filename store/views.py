"""The SQL views a user can query, with their columns, and the closest one to a mistyped name.

    klong sql --views                       # one line per view: name: column TYPE, ...
    klong sql "SELECT * FROM rollout"       # error: ... did you mean `rollouts`?

Internal views and tables (`_raw_*`, `_datasets`, ... : names starting with `_`) are left out; the extension
views (datasets, samples, rl_*, training, blacklist, ...) are included: a catalog connection made without a
query creates every view.
"""

from __future__ import annotations

import difflib
import re

from core.settings import Settings

_MISSING = re.compile(r"(?:Table|View) with name \"?([\w.]+)\"? does not exist", re.IGNORECASE)


def user_views(settings: Settings) -> list[tuple[str, list[tuple[str, str]]]]:
    """(view name, [(column, type), ...]) of every user-facing view, sorted by name."""
    from store.catalog import Catalog

    con = Catalog(settings).connect()
    try:
        rows = con.execute("""
            SELECT table_name, column_name, data_type FROM duckdb_columns()
            WHERE NOT internal AND table_name NOT LIKE '\\_%' ESCAPE '\\'
              AND table_name IN (SELECT view_name FROM duckdb_views() WHERE NOT internal)
            ORDER BY table_name, column_index""").fetchall()
    finally:
        con.close()
    out: dict[str, list[tuple[str, str]]] = {}
    for view, col, typ in rows:
        out.setdefault(view, []).append((col, typ))
    return sorted(out.items())


def closest(name: str, names: list[str]) -> str | None:
    hits = difflib.get_close_matches(name.lower(), names, n=1, cutoff=0.6)
    return hits[0] if hits else None


def suggest_view(error: str, settings: Settings) -> str:
    """For a query error naming a view that does not exist: " (did you mean `X`? ...)", else ""."""
    m = _MISSING.search(error)
    if not m:
        return ""
    names = [v for v, _ in user_views(settings)]
    best = closest(m[1].split(".")[-1], names)
    hint = f"did you mean `{best}`? " if best else ""
    return f" ({hint}`klong sql --views` lists the views and their columns)"
