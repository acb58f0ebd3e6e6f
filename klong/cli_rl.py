"""`klong rl run|status|check`: progressive RL plans (rl.scheduler, rl.plan, store.rl).

    klong rl check two-stage.yaml             # validate the plan, print its schedule; runs nothing
    klong rl run two-stage.yaml               # run it: rollouts, carry-overs, judgments, one dataset per iteration
    klong rl run two-stage.yaml --external-sink   # an external `klong sink run` archives (no in-process sink)
    klong rl status [--plan NAME] [--run ID] [--all-runs] [--json]

`run` prints one progress line per iteration step (start, close, waiting for the archive and judge,
dataset built, trained, reloaded) and a summary; with `serve:` and `train: {config: ...}` in the plan it
closes the loop (a managed vLLM server, training each iteration, a weight reload). Run again on the same
plan, it resumes after the last iteration earlier runs finished; Ctrl-C (or SIGTERM) stops cleanly: queued rollouts are not started,
running ones end at their next turn as `aborted`, everything recorded is archived (a second Ctrl-C exits
at once: the durable outbox keeps what was recorded for the next run). `status` answers from
the archive (`rl_iterations`): per stage and iteration the rollouts started / carried in / carried out /
running / ended by status / judged, the training reward (mean_score) beside the held-out evaluation
under the same policy (eval_score; `eval:` in the plan, and the final evaluation after the last
iteration), the dataset version, and where the time went (rolling vs waiting
for the judge vs building vs the plan's train hook).
"""

from __future__ import annotations

import json
import os
import signal
import sys

STATUS_COLUMNS = ["stage", "iteration", "policy_version", "phase", "started", "carried_in", "carried_out",
                  "not_started", "running", "finished", "timeout", "error", "aborted", "judged", "mean_score",
                  "eval_score", "eval_solved", "eval_judged", "dataset",
                  "n_samples", "rolling_s", "judge_wait_s", "build_s", "train_s", "reload_s", "reload_method"]


def _settings(args):
    from core.settings import Settings

    return Settings.load(args.home, args.bootstrap_servers, args.topic_prefix)


def _err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def cmd_check(args) -> int:
    from rl.plan import load_plan

    plan = load_plan(args.plan)
    tasks = f"tasks {', '.join(plan.tasks)}" if plan.tasks else f"every registered {plan.split} task"
    policy = (f"a managed vLLM server for {plan.serve['model']} ({plan.serve.get('device', 'cpu')})" if plan.serve
              else f"{plan.policy.model} at {plan.policy.base_url}")
    judge = ("rubric check commands only (no judge model)" if plan.checks_only else
             f"{plan.judge.model} at {plan.judge.base_url} (in-process)" if plan.judge else "external (klong judge run)")
    print(f"plan {plan.name}: {tasks}; policy {policy}; judge {judge}")
    print(f"dataset {plan.dataset_name} (one version per iteration), config {json.dumps(plan.dataset_config)}")
    if plan.train_config:
        print(f"after each dataset: klong train --config {plan.train_config} {' '.join(plan.train_overrides)} from the "
              "served checkpoint, then a weight reload of the server"
              + (f" (timeout {plan.train_timeout_s:g}s)" if plan.train_timeout_s else ""))
    elif plan.train_command:
        print(f"train hook after each dataset: {plan.train_command}"
              + (f" (timeout {plan.train_timeout_s:g}s)" if plan.train_timeout_s else ""))
    print(f"close at {plan.close_fraction:g} of an iteration's rollouts ended"
          + (f" or after {plan.iteration_timeout_s:g}s" if plan.iteration_timeout_s else "")
          + f"; judge_timeout {plan.judge_timeout_s:g}s; {plan.max_concurrent_rollouts} rollouts at once")
    print("iterations (numbered after the highest iteration already in the archive when run):")
    for stage, it, pv in plan.schedule():
        samples = stage.samples_per_iteration or "all"
        print(f"  stage {stage.index} iteration {it}: policy v{pv}, timeout {stage.timeout_s:g}s, "
              f"{samples} samples x {stage.rollouts_per_sample} rollouts")
    return 0


def cmd_run(args) -> int:
    from rl.plan import load_plan
    from rl.scheduler import Scheduler, Stopped

    plan = load_plan(args.plan)
    fleet = args.workers if args.workers is not None else (0 if args.fleet else None)
    sched = Scheduler(_settings(args), plan, embedded_sink=not args.external_sink, progress=_err, fleet=fleet)

    def on_signal(*_):
        if sched.stopping:  # a second Ctrl-C: do not wait for tool calls in flight (the outbox spool is durable)
            _err(f"[rl {plan.name}] second stop request: exiting now; what was recorded stays in the outbox and is "
                 "sent by the next run; rollouts still in a tool call stay 'running' in the archive")
            os._exit(130)
        _err(f"[rl {plan.name}] stop requested: finishing cleanly (running rollouts end at their next turn; "
             "Ctrl-C again to exit at once)")
        sched.stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        summaries = sched.run()
    except Stopped:
        _err(f"[rl {plan.name}] stopped; `klong rl status --plan {plan.name}` shows how far it got")
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for s in summaries:
        print(f"stage {s.stage} iteration {s.iteration} policy v{s.policy_version}: {s.started} started, "
              f"{s.carried_in} carried in, {len(s.carried_out)} carried out, ended "
              f"{', '.join(f'{k} {v}' for k, v in sorted(s.ended.items())) or 'none'}, judged {s.judged} -> "
              f"{s.dataset} ({s.n_samples} samples)"
              + (f"; trained {s.checkpoint}, {s.reload_method} {s.reload_s:.2f}s" if s.checkpoint else ""))
    for e in sched.evals:
        print(f"iteration {e.iteration} {e.line()}")
    print(f"run {sched.run_id} done: klong rl status --plan {plan.name}")
    return 0


def status_rows(settings, plan: str | None = None, run: str | None = None, all_runs: bool = False) -> list[dict]:
    """Rows of `rl_iterations` for the status table: the latest run of each plan unless `run` / `all_runs`."""
    from store.catalog import Catalog, sql_str

    where = []
    if plan:
        where.append(f"plan = {sql_str(plan)}")
    if run:
        where.append(f"run_id = {sql_str(run)}")
    elif not all_runs:
        where.append("run_id IN (SELECT arg_max(run_id, started_at) FROM rl_iterations GROUP BY plan)")
    sql = ("SELECT * FROM rl_iterations" + (" WHERE " + " AND ".join(where) if where else "")
           + " ORDER BY plan, started_at, iteration")
    return Catalog(settings).arrow(sql).to_pylist()


def cmd_status(args) -> int:
    import pyarrow as pa

    from klong.cli_output import _print_table

    rows = status_rows(_settings(args), args.plan, args.run, args.all_runs)
    if args.json:
        for r in rows:
            print(json.dumps(r, default=str))
        return 0
    if not rows:
        print("no plan runs in the archive" + (f" for plan {args.plan}" if args.plan else "")
              + " (klong rl run PLAN.yaml; the sink must have archived its events)")
        return 1 if args.plan else 0
    runs: dict = {}
    for r in rows:
        runs.setdefault((r["plan"], r["run_id"]), []).append(r)
    for (plan, run_id), its in runs.items():
        roll = sum(r["rolling_s"] or 0 for r in its)
        wait = sum(r["judge_wait_s"] or 0 for r in its)
        build = sum(r["build_s"] or 0 for r in its)
        train = sum(r["train_s"] or 0 for r in its)
        total = roll + wait + build + train or 1.0
        print(f"plan {plan}  run {run_id}  started {str(its[0]['started_at'])[:19]}")
        print(f"time: rolling {roll:.1f}s ({100 * roll / total:.0f}%), waiting for archive+judge {wait:.1f}s "
              f"({100 * wait / total:.0f}%), building datasets {build:.1f}s ({100 * build / total:.0f}%), "
              f"train hook {train:.1f}s ({100 * train / total:.0f}%)")
        table = [{c: (round(r[c], 3 if c.endswith("score") else 1) if isinstance(r[c], float) else r[c])
                  for c in STATUS_COLUMNS} for r in its]
        _print_table(pa.Table.from_pylist(table), "table", None)
        evals = eval_rows(_settings(args), plan, [r["iteration"] for r in its])
        if evals:
            print("held-out evaluations (rl_evals): the policy each scored, mean score and solved of the judged")
            _print_table(pa.Table.from_pylist(evals), "table", None)
    return 0


def eval_rows(settings, plan: str, iterations: list[int]) -> list[dict]:
    """`rl_evals` rows of a plan run: those beside its iterations and the final one after its last."""
    from store.catalog import Catalog, sql_str

    if not iterations:
        return []
    its = ", ".join(str(int(i)) for i in iterations + [max(iterations) + 1])
    return Catalog(settings).arrow(
        "SELECT iteration, policy_version, rollouts, judged, round(mean_score, 3) AS mean_score, solved, "
        f"round(solve_rate, 3) AS solve_rate FROM rl_evals WHERE plan = {sql_str(plan)} AND iteration IN ({its}) "
        "ORDER BY iteration").to_pylist()


def register(sub, common) -> None:
    """Adds `klong rl run|status|check` to the `klong` parser."""
    import argparse

    r = sub.add_parser("rl", help="progressive RL: run a staged plan of rollouts, carry-overs, judgments, datasets",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    rsub = r.add_subparsers(dest="action", required=True, metavar="ACTION")

    ck = rsub.add_parser("check", parents=[common], help="validate a plan YAML and print its schedule (runs nothing)")
    ck.add_argument("plan", help="plan YAML (see rl/plan.py for every key)")
    ck.set_defaults(func=cmd_check)

    run = rsub.add_parser("run", parents=[common], help="run a plan: per iteration start rollouts, close "
                          "(carrying running ones over), wait for the judge, build the RL dataset version")
    run.add_argument("plan", help="plan YAML: name, tasks, policy, [judge], stages, dataset, close rule "
                                  "(klong rl check PLAN shows what it means)")
    run.add_argument("--external-sink", action="store_true",
                     help="do not archive in-process: an external `klong sink run` is running on this home")
    run.add_argument("--workers", type=int, metavar="N",
                     help="run rollouts on the rollout fleet and start N local `klong rollout worker` processes "
                          "(they share max_concurrent_rollouts); default: rollouts run in threads of this process")
    run.add_argument("--fleet", action="store_true",
                     help="run rollouts on the rollout fleet: publish requests to <prefix>.rollout.requests for "
                          "`klong rollout worker` processes started elsewhere (with --workers N: N local ones too)")
    run.set_defaults(func=cmd_run)

    st = rsub.add_parser("status", parents=[common], help="per stage and iteration: rollouts running / carried "
                         "over / judged, datasets, and where the time goes (from the archive)")
    st.add_argument("--plan", help="only this plan (default: every plan in the archive)")
    st.add_argument("--run", help="only this run id (default: the latest run of each plan)")
    st.add_argument("--all-runs", action="store_true", help="every run, not only the latest of each plan")
    st.add_argument("--json", action="store_true", help="one JSON object per iteration (all rl_iterations columns)")
    st.set_defaults(func=cmd_status)
