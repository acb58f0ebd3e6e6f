"""Held-out evaluation inside a progressive-RL plan run (`eval:`): the real broker, sink, judge worker (against
the judge stub) and agent runner (against the scripted policy stub). Eval rollouts run under each iteration's
policy and once more after the last, at eval priority, and never enter a training dataset."""

from __future__ import annotations

import pytest
import yaml

from consumers.materialize import build_version
from klong.cli import main
from rl.plan import parse_plan
from rl.scheduler import Scheduler
from producers.tasks import import_tasks
from schemas.errors import ConfigError
from store.catalog import Catalog
from tests.openai_stub import StubModel
from tests.policy_stub import PolicyStub
from tests.test_rubric import leaf, parent
from tests.test_scheduler import QUICK, plan_dict, register_tasks
from tests.test_tasks import klong, make_task


def register_eval_tasks(settings, tmp_path) -> None:
    paper = "# A held-out paper\nWe test a model.\n"
    for t in ("ea", "eb"):
        make_task(tmp_path / "eval-tasks", t, title=f"Held out {t}", paper=paper,
                  rubric=parent("root", [leaf("good [score=1]"), leaf("bad [score=0]")]))
    import_tasks(settings, [tmp_path / "eval-tasks" / t for t in ("ea", "eb")], "eval")


def eval_plan(policy_url: str, judge_url: str) -> dict:
    raw = plan_dict(policy_url, judge_url)
    raw.update(name="with-eval", close_fraction=1.0,
               stages=[{"timeout": "30s", "rollouts_per_sample": 2, "iterations": 2}],
               eval={"split": "eval", "every": 1, "rollouts_per_sample": 2},
               train="echo {dataset} {next_policy_version} >> trained.txt")
    return raw


def test_eval_rollouts_run_each_iteration_and_after_the_last_and_never_enter_a_dataset(settings, tmp_path, capsys,
                                                                                        monkeypatch):
    register_tasks(settings, tmp_path)
    register_eval_tasks(settings, tmp_path)
    monkeypatch.chdir(tmp_path)
    with PolicyStub(QUICK) as policy, StubModel() as judge:
        (tmp_path / "plan.yaml").write_text(yaml.safe_dump(eval_plan(policy.url, judge.url)))
        assert main(klong(settings, "rl", "run", "plan.yaml")) == 0
        out = capsys.readouterr()
    assert "eval at iteration 1 (policy v0): 4 rollouts of 2 held-out tasks x 2" in out.err
    assert "iteration 3 eval under policy v2: mean score 0.500, solved 0/4" in out.out  # the final one
    cat = Catalog(settings)
    evals = cat.arrow("SELECT iteration, policy_version, rollouts, judged, mean_score, tasks FROM rl_evals "
                      "ORDER BY iteration").to_pylist()
    assert evals == [{"iteration": i, "policy_version": i - 1, "rollouts": 4, "judged": 4, "mean_score": 0.5,
                      "tasks": 2} for i in (1, 2, 3)]
    eval_ids = {r["rollout_id"] for r in cat.arrow(
        "SELECT rollout_id FROM rollouts WHERE task_id IN ('ea', 'eb')").to_pylist()}
    assert len(eval_ids) == 12
    # at eval priority in the judge queue; the training rollouts at train priority
    prio = cat.arrow("SELECT task_id IN ('ea', 'eb') AS is_eval, list(DISTINCT priority) AS p FROM judge_requests "
                     "GROUP BY ALL ORDER BY ALL").to_pylist()
    assert prio == [{"is_eval": False, "p": ["train"]}, {"is_eval": True, "p": ["eval"]}]
    # the iteration's own rollouts (training reward) beside the evaluation under the same policy
    its = cat.arrow("SELECT iteration, policy_version, started, judged, mean_score, eval_score, eval_judged, n_samples "
                    "FROM rl_iterations ORDER BY iteration").to_pylist()
    assert [(r["iteration"], r["started"], r["judged"], r["eval_score"], r["eval_judged"]) for r in its] == [
        (1, 4, 4, 0.5, 4), (2, 4, 4, 0.5, 4)]
    # never trained on: not in the iterations' datasets, nor in a dataset of everything archived
    trained = {r["rollout_id"] for r in cat.arrow("SELECT DISTINCT rollout_id FROM samples").to_pylist()}
    assert trained and not trained & eval_ids
    everything = build_version(settings.home, "all-rl", "rl", {"max_tokens": 200000})
    assert everything.manifest["drops"]["eval_task"]["count"] == 12
    rows = cat.arrow("SELECT DISTINCT rollout_id FROM samples WHERE dataset = 'all-rl'").to_pylist()
    assert rows and not {r["rollout_id"] for r in rows} & eval_ids
    # `klong demo`'s learning figure: the solve rate per policy version of the plan's own (training) rollouts
    from klong.demo import SOLVE_RATE_SQL

    rates = cat.arrow(SOLVE_RATE_SQL.format(plan="with-eval")).to_pylist()
    assert [(r["policy_version"], r["rollouts"], r["solved"], r["mean_score"], r["solve_rate"]) for r in rates] == [
        (0, 4, 2, 0.75, 0.5), (1, 4, 2, 0.75, 0.5)]
    # `klong report`'s figure: training reward beside the held-out score, per policy version
    from ui.report import render, series

    ev = series("evals", cat, "with-eval")
    assert ev["policy_version"] == [0, 1, 2] and ev["train_score"] == [0.75, 0.75, None]
    assert ev["eval_score"] == [0.5, 0.5, 0.5] and ev["eval_n"] == [4, 4, 4]
    assert render("evals", cat, "with-eval").startswith(b"\x89PNG")
    # klong rl status shows the scores beside each other and the evaluations table
    assert main(klong(settings, "rl", "status", "--plan", "with-eval")) == 0
    status = capsys.readouterr().out
    assert "eval_score" in status and "held-out evaluations (rl_evals)" in status
    assert (tmp_path / "trained.txt").read_text().count("\n") == 2


def test_eval_plan_keys_and_task_checks(settings, tmp_path):
    base = eval_plan("http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1")
    plan = parse_plan(base)
    assert plan.eval.every == 1 and plan.eval.rollouts_per_sample == 2 and plan.final_eval
    assert [plan.eval.due(k) for k in (1, 2, 3)] == [True, True, True]
    every2 = parse_plan({**base, "eval": {"tasks": ["ea"], "every": 2, "final": False}})
    assert [every2.eval.due(k) for k in (1, 2, 3)] == [True, False, True] and not every2.final_eval
    no_train = parse_plan({k: v for k, v in base.items() if k != "train"})
    assert not no_train.final_eval  # nothing trained: the last policy was evaluated already
    for bad, message in (({"split": "train"}, "eval.split must be eval"), ({}, "eval needs tasks"),
                         ({"split": "eval", "tasks": ["ea"]}, "eval needs tasks"),
                         ({"split": "eval", "every": 0}, "eval.every must be an integer >= 1"),
                         ({"split": "eval", "oops": 1}, "unknown key eval.oops"),
                         ({"tasks": ["ea", "ea"]}, "lists a task twice")):
        with pytest.raises(ConfigError, match=message):
            parse_plan({**base, "eval": bad})
    register_tasks(settings, tmp_path)
    for tasks, message in ((["ta"], r"eval.tasks \['ta'\] are train tasks"),
                           (["nope"], r"eval.tasks \['nope'\] are not registered")):
        with pytest.raises(ConfigError, match=message):
            Scheduler(settings, parse_plan({**base, "eval": {"tasks": tasks}})).run()
    with pytest.raises(ConfigError, match="no eval task is registered"):
        Scheduler(settings, plan).run()
