"""A query's connection creates the views that query reads (and what those read); a catalog listing sees them all."""

from __future__ import annotations

from store.catalog import Catalog

VIEWS = "SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY 1"


def views(con) -> set[str]:
    return {r[0] for r in con.execute(VIEWS).fetchall()}


def test_a_query_gets_what_it_reads_and_a_listing_gets_every_view(settings):
    settings.archive.mkdir(parents=True, exist_ok=True)
    cat = Catalog(settings)
    every = views(cat.connect())
    assert {"steps", "rollouts", "step_tokens", "conflicting_duplicates", "rl_iterations"} <= every
    assert views(cat.connect(VIEWS)) == every  # duckdb_views() in the query: every view
    steps = views(cat.connect("SELECT count(*) FROM steps"))
    assert {"steps", "step_events", "_raw_step"} <= steps and not {"rollouts", "step_tokens"} & steps
    # rollouts reads steps, judge_results and the rollout event views: all of them are there, and the query runs
    rollouts = views(cat.connect("SELECT * FROM rollouts"))
    assert {"rollouts", "steps", "judge_results", "rollout_started_events", "rollout_ended_events"} <= rollouts
    assert cat.arrow("SELECT count(*) AS n FROM rollouts").to_pylist() == [{"n": 0}]
