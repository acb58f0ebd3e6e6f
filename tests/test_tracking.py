"""Experiment trackers (trainer/tracking.py): `klong train` with `train.report_to` writes every step's metrics and
the run's lineage to TensorBoard, MLflow and W&B, offline under the run directory; the RL loop adds one point
per iteration with its rewards. Everything is read back with each tracker's own reader (tests/tracker_readers.py);
a tracker that does not import here is skipped, saying why."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from klong.cli import main
from rl.iteration import IterationSummary
from rl.plan import parse_plan
from schemas.errors import ConfigError
from store.datasets import load_manifest
from tests import tracker_readers as read
from tests.test_trainer_data import train_home  # noqa: F401  (session fixture)
from tests.test_trainer_run import klong, run_dir_of, steps_of
from trainer.config import load_config
from trainer.tracking import REPORTERS, Tracker, iteration_metrics, log_iteration, resolve_report_to

MISSING = [n for n in REPORTERS if importlib.util.find_spec(n) is None]
needs_all = pytest.mark.skipif(bool(MISSING), reason=f"not installed here: {', '.join(MISSING)} (pip install "
                               "tensorboard mlflow-skinny wandb; `make test` installs them)")


def scalars(name: str, run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    return {"tensorboard": read.tensorboard_scalars, "mlflow": read.mlflow_scalars,
            "wandb": lambda d: read.wandb_run(d)["scalars"]}[name](run_dir)


def same(got: list[tuple[int, float]], want: list[tuple[int, float]], rel: float = 1e-6) -> bool:
    """Same steps; values equal to float32 precision (TensorBoard keeps float32)."""
    return [st for st, _ in got] == [st for st, _ in want] and \
        [v for _, v in got] == pytest.approx([v for _, v in want], rel=rel)


def test_report_to_takes_trls_names_and_names_a_bad_one():
    assert resolve_report_to("all") == REPORTERS
    assert resolve_report_to(["wandb", "tensorboard"]) == ("tensorboard", "wandb")
    assert resolve_report_to("none") == resolve_report_to([]) == ()
    assert load_config(None, ["train.report_to=[mlflow]"]).train.report_to == ("mlflow",)
    assert load_config(None, ["train.report_to=tensorboard"]).train.report_to == "tensorboard"
    with pytest.raises(ConfigError, match=r"train.report_to: unknown tracker 'comet' \(known: tensorboard, mlflow, "
                                          r"wandb, all, none\)"):
        load_config(None, ["train.report_to=[tensorboard, comet]"])
    with pytest.raises(ConfigError, match="train.report_to: must be"):
        load_config(None, ["train.report_to=3"])


@needs_all
def test_each_tracker_reads_back_what_was_logged_and_a_resumed_run_goes_on_in_the_same_tracker_run(tmp_path):
    run_dir = tmp_path / "run"
    t = Tracker.open(REPORTERS, run_dir, name="r1", tags={"dataset": "d@1", "dataset_hash": "sha256:" + "a" * 64},
                     config={"optim": {"lr": 0.1}})
    for step in (1, 2):
        t.log(step, {"loss": 3.0 / step, "lr": 0.1, "flag": True, "note": "not a number"})
    t.close("interrupted")
    t = Tracker.open(REPORTERS, run_dir, name="r1", tags={"dataset": "d@1"}, config={"optim": {"lr": 0.1}})
    t.log(3, {"loss": 0.5, "lr": 0.1})
    t.set_tags({"policy_version_out": 2, "unset": None})
    t.close("finished")
    for name in REPORTERS:
        got = scalars(name, run_dir)
        assert set(got) == {"train/loss", "train/lr"}, name  # numbers only; bools and text are not scalars
        assert same(got["train/loss"], [(1, 3.0), (2, 1.5), (3, 0.5)]), (name, got)
    texts = read.tensorboard_texts(run_dir)
    assert texts["lineage/dataset"] == "d@1" and texts["lineage/policy_version_out"] == "2"
    client, run = read.mlflow_run(run_dir)  # one MLflow run across the resume
    assert run.data.tags["dataset_hash"] == "sha256:" + "a" * 64 and run.data.tags["policy_version_out"] == "2"
    assert run.data.params["optim.lr"] == "0.1" and run.info.status == "FINISHED"
    wb = read.wandb_run(run_dir)
    assert len(wb["ids"]) == 1 and {"dataset:d@1", "policy_version_out:2"} <= wb["tags"]
    assert wb["config"]["lineage/dataset_hash"] == "sha256:" + "a" * 64
    assert json.loads((run_dir / "trackers.json").read_text()) == {"mlflow": run.info.run_id, "wandb": wb["ids"].pop()}


def test_a_tracker_that_is_not_installed_fails_the_run_before_training(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    with pytest.raises(ConfigError, match=r"train.report_to: wandb is not installed \(pip install wandb\)"):
        Tracker.open(["tensorboard", "wandb"], tmp_path / "run", name="r", tags={}, config={})
    assert not (tmp_path / "run").exists()


@needs_all
def test_klong_train_reports_every_step_and_the_lineage_to_every_tracker(train_home, capsys):
    s = train_home
    assert main(klong(s, "train", "--dataset", "sft@1", "--config", "sft_tiny", "data.micro_batch_tokens=1200",
                      "train.max_steps=6", "train.save_every=3", "train.log_every=3",
                      "train.report_to=all")) == 0  # TRL's `all`: every tracker installed here
    out = capsys.readouterr().out
    run_dir = run_dir_of(out)
    assert f"tracking: tensorboard {run_dir / 'tensorboard'}, mlflow file://{run_dir / 'mlruns'}" in out
    steps = steps_of(run_dir)
    want = {k: [(i, steps[i][k]) for i in range(1, 7)] for k in ("loss", "lr", "grad_norm", "tokens")}
    for name in REPORTERS:  # every step (not only every log_every), with steps.jsonl's values
        got = scalars(name, run_dir)
        for k, series in want.items():
            assert same(got[f"train/{k}"], series), (name, k, got[f"train/{k}"])
    manifest = load_manifest(s.home, "sft@1")
    lineage = {"dataset": "sft@1", "dataset_hash": manifest["content_hash"], "mode": "sft", "run_id": run_dir.name,
               "policy_version_in": "0", "policy_version_out": "2", "status": "finished"}
    texts = read.tensorboard_texts(run_dir)
    assert {k: texts[f"lineage/{k}"] for k in lineage} == lineage
    _, run = read.mlflow_run(run_dir)
    assert {k: run.data.tags[k] for k in lineage} == lineage and run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "6"
    wb = read.wandb_run(run_dir)
    assert {"dataset:sft@1", "mode:sft", "policy_version_out:2"} <= wb["tags"]
    assert wb["config"]["lineage/dataset_hash"] == manifest["content_hash"]


def test_the_rl_loop_logs_each_iterations_rewards(train_home, tmp_path, monkeypatch):
    """One point per iteration: the rewards of the rollouts the iteration's dataset trained on."""
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    plan = parse_plan({"name": "p", "tasks": ["task-a"], "policy": {"base_url": "http://127.0.0.1:9/v1", "model": "m"},
                       "stages": [{"timeout": "60s", "rollouts_per_sample": 2, "iterations": 2}],
                       "dataset": {"name": "rl"}, "train": "true"})
    monkeypatch.setenv("KLONG_REPORT_TO", "tensorboard")
    s = train_home
    import pyarrow.parquet as pq

    samples = pq.read_table(s.home / "datasets" / "rl" / "v1" / "samples.parquet").to_pylist()
    final = {}
    for row in sorted(samples, key=lambda r: r["window_idx"]):
        final[row["rollout_id"]] = row["q"]
    mean = sum(final.values()) / len(final)
    for it in (1, 2):
        summary = IterationSummary(stage=1, iteration=it, policy_version=it - 1, started=12, judged=12,
                                   ended={"finished": 12}, dataset="rl@1", n_samples=len(samples), rolling_s=1.5)
        run_dir = log_iteration(s, plan, summary, "loop-1")
    assert run_dir == s.home / "runs" / "rl-p"
    got = read.tensorboard_scalars(run_dir)
    assert same(got["rl/reward_mean"], [(1, mean), (2, mean)]), got["rl/reward_mean"]
    solved = sum(q >= 1 for q in final.values()) / len(final)
    assert same(got["rl/solved_frac"], [(1, solved), (2, solved)])
    assert got["rl/ended_finished"] == [(1, 12.0), (2, 12.0)] and got["rl/policy_version"] == [(1, 0.0), (2, 1.0)]
    assert read.tensorboard_texts(run_dir)["lineage/iteration_2_dataset"] == "rl@1"
    assert iteration_metrics(s.home, summary)["rewarded_rollouts"] == len(final)
    monkeypatch.delenv("KLONG_REPORT_TO")
    assert log_iteration(s, plan, summary, "loop-1") is None  # no tracker asked for: nothing written


def test_klong_rl_run_logs_each_iterations_rewards_to_the_plans_tracker(settings, tmp_path, monkeypatch):
    """The real scheduler (scripted policy, stub judge): one point per iteration, equal to the rollouts' scores."""
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    from rl.scheduler import Scheduler
    from store.catalog import Catalog
    from tests.openai_stub import StubModel
    from tests.policy_stub import PolicyStub
    from tests.test_scheduler import QUICK, plan_dict, register_tasks

    register_tasks(settings, tmp_path)
    monkeypatch.setenv("KLONG_REPORT_TO", "tensorboard")  # the plan trains with a shell hook: no trainer config
    with PolicyStub(QUICK) as policy, StubModel() as judge:
        raw = plan_dict(policy.url, judge.url)
        raw.update(tasks=["ta", "tb"], train="true",
                   stages=[{"timeout": "60s", "rollouts_per_sample": 2, "iterations": 2}])
        summaries = Scheduler(settings, parse_plan(raw), progress=lambda line: None).run()
    assert [s.iteration for s in summaries] == [1, 2]
    got = read.tensorboard_scalars(settings.home / "runs" / "rl-two-stage")
    # a rollout counts in the iteration it ended in (carried over from iteration 1 when it closed at 3 of 4)
    rows = Catalog(settings).arrow("SELECT last_iteration AS iteration, avg(final_score) AS mean FROM rollouts "
                                   "GROUP BY 1 ORDER BY 1").to_pylist()
    assert same(got["rl/reward_mean"], [(r["iteration"], r["mean"]) for r in rows]), (got["rl/reward_mean"], rows)
    assert [st for st, _ in got["rl/samples"]] == [1, 2] and all(v > 0 for _, v in got["rl/samples"])
