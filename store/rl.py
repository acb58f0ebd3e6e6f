"""SQL views of progressive-RL plan runs, built on the scheduler's `rl_iteration` events (rl.scheduler).

    klong sql "SELECT stage, iteration, policy_version, phase, started, carried_in, carried_out, running,
                      finished, timeout, judged, dataset, rolling_s, judge_wait_s FROM rl_iterations"
    klong sql "SELECT rollout_id, first_iteration, last_iteration, n_resumes, status FROM rl_rollouts
               WHERE plan = 'two-stage' AND carried"
    klong rl status [--plan NAME]        # the same numbers as a table

- `rl_iterations`: one row per (plan, run_id, iteration). The scheduler's decisions come from its events
  (`started`: new and carried-in rollouts, `closed`: carried-out / never started, `dataset_built`: the
  version, time waiting for the judge); what happened to each rollout comes from the archive (`rollouts`
  view), so the counts are live while a run goes on: `running` = members still running in this
  iteration (not carried out), `queued` = planned but not archived as started yet, `finished` /
  `timeout` / `error` / `aborted` = members that *ended in this iteration* (their last iteration after
  resumes is this one), `judged` = those with a valid judge result. `phase` is rolling | closed | built |
  trained | stopped. `rolling_s` is start -> close (up to now while rolling); `judge_wait_s` close ->
  archive and judge caught up; `build_s` the dataset build; `train_s` the plan's train step; with a managed
  policy server (`serve:` in the plan) `checkpoint` (the weights served next), `train_run`, `reload_s` and
  `reload_method` (reload in place | restart | skipped). The training reward: `mean_score` (judged rollouts
  that ended in the iteration) and `solved` (score 1.0); beside it the held-out evaluation that ran under
  the same policy (`eval_score`, `eval_solved` of `eval_judged`; NULL where none ran).
- `rl_evals`: one row per held-out evaluation of a plan (`eval:` in the plan): plan, iteration (the one it ran
  beside, or last + 1 for the final one), policy_version, rollouts, judged, mean_score, solved, solve_rate,
  score_std, tasks. Read from the `rollouts` view by the evaluation's group ids (PLAN:eval:i<iteration>:<task>).
- `rl_rollouts`: one row per rollout a plan run started: the iteration it was planned in and the
  iteration it ended in (after carry-overs), `carried` (resumed at least once), status, score.
All exist, empty, on an archive without plan runs.
"""

from __future__ import annotations

VIEWS = {
    "_rl_started": """
        SELECT plan, run_id, iteration, arg_max(stage, produced_at) AS stage,
               arg_max(policy_version, produced_at) AS policy_version, arg_max(timeout_s, produced_at) AS timeout_s,
               min(produced_at) AS started_at, arg_max(rollouts, produced_at) AS rollouts,
               arg_max(carried_in, produced_at) AS carried_in
        FROM rl_iteration_events WHERE phase = 'started' GROUP BY plan, run_id, iteration""",
    "_rl_closed": """
        SELECT plan, run_id, iteration, max(produced_at) AS closed_at, arg_max(carried_out, produced_at) AS carried_out,
               arg_max(not_started, produced_at) AS not_started, arg_max(rolling_s, produced_at) AS rolling_s
        FROM rl_iteration_events WHERE phase = 'closed' GROUP BY plan, run_id, iteration""",
    "_rl_built": """
        SELECT plan, run_id, iteration, max(produced_at) AS built_at, arg_max(dataset, produced_at) AS dataset,
               arg_max(dataset_hash, produced_at) AS dataset_hash, arg_max(n_samples, produced_at) AS n_samples,
               arg_max(judge_wait_s, produced_at) AS judge_wait_s, arg_max(build_s, produced_at) AS build_s,
               arg_max(judge_missing, produced_at) AS judge_missing
        FROM rl_iteration_events WHERE phase = 'dataset_built' GROUP BY plan, run_id, iteration""",
    "_rl_trained": """
        SELECT plan, run_id, iteration, max(produced_at) AS trained_at, arg_max(train_s, produced_at) AS train_s,
               arg_max(checkpoint, produced_at) AS checkpoint, arg_max(train_run, produced_at) AS train_run,
               arg_max(reload_s, produced_at) AS reload_s, arg_max(reload_method, produced_at) AS reload_method
        FROM rl_iteration_events WHERE phase = 'trained' GROUP BY plan, run_id, iteration""",
    "_rl_stopped": """
        SELECT plan, run_id, iteration, max(produced_at) AS stopped_at, arg_max(error, produced_at) AS stop_reason
        FROM rl_iteration_events WHERE phase = 'stopped' GROUP BY plan, run_id, iteration""",
    "_rl_not_started": """
        SELECT DISTINCT plan, run_id, iteration, unnest(not_started) AS rollout_id
        FROM rl_iteration_events WHERE phase IN ('closed', 'stopped')""",
    # Every (iteration, rollout) membership: the iteration's new rollouts (minus those never started) and
    # the ones carried in; `carried_out` marks those the scheduler carried on into the next iteration (unless
    # the rollout ended before taking the carry-over: then it ended in this iteration after all).
    "_rl_members": """
        WITH m AS (
            SELECT s.plan, s.run_id, s.iteration, unnest(s.rollouts) AS rollout_id, false AS carried_in
            FROM _rl_started s
            UNION ALL
            SELECT s.plan, s.run_id, s.iteration, unnest(s.carried_in) AS rollout_id, true AS carried_in
            FROM _rl_started s)
        SELECT m.*, list_contains(coalesce(c.carried_out, []), m.rollout_id) AND NOT coalesce(
                   r.status <> 'running' AND r.last_iteration = m.iteration, false) AS carried_out
        FROM m LEFT JOIN _rl_closed c USING (plan, run_id, iteration) LEFT JOIN rollouts r USING (rollout_id)
        ANTI JOIN _rl_not_started n USING (plan, run_id, iteration, rollout_id)""",
    # Held-out evaluations (a plan's `eval:`): their rollouts' group ids are PLAN:eval:i<iteration>:<task>
    # (rl.iteration.eval_group_prefix); plan names hold no ':'.
    "rl_evals": """
        SELECT regexp_extract(group_id, '^([^:]+):eval:i([0-9]+):', 1) AS plan,
               CAST(regexp_extract(group_id, '^([^:]+):eval:i([0-9]+):', 2) AS INTEGER) AS iteration,
               min(policy_version) AS policy_version, count(*) AS rollouts,
               count(*) FILTER (WHERE status = 'running') AS running,
               count(*) FILTER (WHERE n_judged > 0) AS judged,
               avg(final_score) FILTER (WHERE n_judged > 0) AS mean_score,
               count(*) FILTER (WHERE final_score = 1.0) AS solved,
               count(*) FILTER (WHERE final_score = 1.0) / nullif(count(*) FILTER (WHERE n_judged > 0), 0) AS solve_rate,
               stddev_samp(final_score) FILTER (WHERE n_judged > 0) AS score_std,
               count(DISTINCT task_id) AS tasks
        FROM rollouts WHERE regexp_matches(group_id, '^[^:]+:eval:i[0-9]+:')
        GROUP BY ALL""",
    "rl_iterations": """
        WITH per AS (
            SELECT m.plan, m.run_id, m.iteration,
                   count(*) FILTER (WHERE NOT m.carried_in) AS started,
                   count(*) FILTER (WHERE m.carried_in) AS carried_in,
                   count(*) FILTER (WHERE m.carried_out) AS carried_out,
                   count(*) FILTER (WHERE r.rollout_id IS NULL AND NOT m.carried_out) AS queued,
                   count(*) FILTER (WHERE r.status = 'running' AND NOT m.carried_out
                                    AND r.last_iteration = m.iteration) AS running,
                   count(*) FILTER (WHERE r.status = 'finished' AND r.last_iteration = m.iteration) AS finished,
                   count(*) FILTER (WHERE r.status = 'timeout' AND r.last_iteration = m.iteration) AS timeout,
                   count(*) FILTER (WHERE r.status = 'error' AND r.last_iteration = m.iteration) AS error,
                   count(*) FILTER (WHERE r.status = 'aborted' AND r.last_iteration = m.iteration) AS aborted,
                   count(*) FILTER (WHERE r.status <> 'running' AND r.last_iteration = m.iteration
                                    AND r.n_judged > 0) AS judged,
                   avg(r.final_score) FILTER (WHERE r.status <> 'running' AND r.last_iteration = m.iteration
                                              AND r.n_judged > 0) AS mean_score,
                   count(*) FILTER (WHERE r.last_iteration = m.iteration AND r.final_score = 1.0) AS solved
            FROM _rl_members m LEFT JOIN rollouts r USING (rollout_id)
            GROUP BY m.plan, m.run_id, m.iteration)
        SELECT s.plan, s.run_id, s.stage, s.iteration, s.policy_version, s.timeout_s,
               CASE WHEN x.stopped_at IS NOT NULL THEN 'stopped' WHEN t.trained_at IS NOT NULL THEN 'trained'
                    WHEN b.built_at IS NOT NULL THEN 'built'
                    WHEN c.closed_at IS NOT NULL THEN 'closed' ELSE 'rolling' END AS phase,
               coalesce(p.started, 0) AS started, coalesce(p.carried_in, 0) AS carried_in,
               coalesce(p.carried_out, 0) AS carried_out, coalesce(n.not_started, 0) AS not_started,
               coalesce(p.queued, 0) AS queued, coalesce(p.running, 0) AS running,
               coalesce(p.finished, 0) AS finished, coalesce(p.timeout, 0) AS timeout,
               coalesce(p.error, 0) AS error, coalesce(p.aborted, 0) AS aborted, coalesce(p.judged, 0) AS judged,
               p.mean_score, coalesce(p.solved, 0) AS solved, e.mean_score AS eval_score, e.solved AS eval_solved,
               e.judged AS eval_judged, b.judge_missing, b.dataset, b.dataset_hash, b.n_samples,
               coalesce(c.rolling_s, CASE WHEN x.stopped_at IS NULL
                   THEN epoch(now() - s.started_at) END) AS rolling_s,
               b.judge_wait_s, b.build_s, t.train_s, t.reload_s, t.reload_method, t.checkpoint, t.train_run,
               s.started_at, c.closed_at, b.built_at, t.trained_at,
               x.stopped_at, x.stop_reason
        FROM _rl_started s LEFT JOIN per p USING (plan, run_id, iteration) LEFT JOIN _rl_closed c USING (plan, run_id, iteration)
             LEFT JOIN _rl_built b USING (plan, run_id, iteration) LEFT JOIN _rl_stopped x USING (plan, run_id, iteration)
             LEFT JOIN _rl_trained t USING (plan, run_id, iteration)
             LEFT JOIN (SELECT plan, run_id, iteration, count(*) AS not_started FROM _rl_not_started GROUP BY ALL) n
                  USING (plan, run_id, iteration)
             LEFT JOIN rl_evals e ON e.plan = s.plan AND e.iteration = s.iteration""",
    "rl_rollouts": """
        SELECT m.plan, m.run_id, m.rollout_id, m.iteration AS first_iteration,
               coalesce(r.last_iteration, m.iteration) AS last_iteration, r.stage, r.task_id, r.group_id,
               coalesce(r.status, 'queued') AS status, r.n_steps, coalesce(r.n_resumes, 0) AS n_resumes,
               coalesce(r.n_resumes, 0) > 0 AS carried, r.policy_version, r.last_policy_version, r.final_score,
               r.n_judged, r.elapsed_s
        FROM _rl_members m LEFT JOIN rollouts r USING (rollout_id)
        WHERE NOT m.carried_in""",
}


VIEW_NAMES = tuple(VIEWS)  # what register_views creates


def register_views(con, settings) -> None:
    """Creates `rl_iterations`, `rl_evals` and `rl_rollouts` (and their `_rl_*` helper views)."""
    for name, body in VIEWS.items():
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {body}")
