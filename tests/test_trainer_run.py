"""Training runs through the real CLI on real-path datasets (tests/test_trainer_data.py `train_home`):
SFT loss falls, lineage reaches SQL and leads back to the events, RL starts from the SFT checkpoint,
two DeepSpeed processes match one, a killed run resumes with the same sample order and weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from consumers.sink import Sink
from klong.cli import main
from store.catalog import Catalog
from store.datasets import load_manifest
from tests.test_trainer_data import train_home  # noqa: F401  (session fixture)

FAST = ["data.micro_batch_tokens=1200", "train.log_every=5"]


def klong(settings, *args) -> list[str]:
    return [*args, "--home", str(settings.home), "--bootstrap-servers", settings.bootstrap_servers,
            "--topic-prefix", settings.topics.prefix]


def run_dir_of(out: str) -> Path:
    return Path(next(line for line in out.splitlines() if line.startswith("run ") and " done: " in line)
                .split(" done: ")[1])


def steps_of(run_dir: Path) -> dict[int, dict]:
    """steps.jsonl -> {step: its last record} (a resumed run repeats the steps after its checkpoint)."""
    out = {}
    for line in (run_dir / "steps.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line torn by SIGKILL
            continue
        out[rec["step"]] = rec
    return out


def test_sft_loss_falls_and_the_lineage_leads_back_to_the_events(train_home, capsys):
    s = train_home
    assert main(klong(s, "train", "--dataset", "sft@1", "--mode", "sft", "--config", "sft_tiny", *FAST,
                      "train.epochs=10", "train.max_steps=30", "train.save_every=15")) == 0
    run_dir = run_dir_of(capsys.readouterr().out)
    steps = steps_of(run_dir)
    losses = [steps[k]["loss"] for k in range(1, 31)]
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses
    # the reader's share of the run's time (epoch packing included), even for these ~40 ms steps
    assert sum(r["reader_s"] for r in steps.values()) < 0.05 * sum(r["step_s"] for r in steps.values())

    Sink(s).run(until_idle=True, idle_s=0.3)
    cat = Catalog(s)
    manifest = load_manifest(s.home, "sft@1")
    run = cat.sql(f"SELECT * FROM training_runs WHERE run_id = '{run_dir.name}'").to_dicts()[0]
    assert run["status"] == "finished" and run["mode"] == "sft" and run["dataset"] == "sft@1"
    assert run["dataset_hash"] == manifest["content_hash"] and run["steps"] == 30 and run["n_checkpoints"] == 2
    assert run["policy_version_in"] == 0 and run["policy_version_out"] == 2
    assert run["final_loss"] == pytest.approx(losses[-1])
    curve = cat.sql(f"SELECT step, value FROM training_metrics WHERE run_id = '{run_dir.name}' AND metric = 'loss' "
                    "ORDER BY step")
    assert curve["step"].to_list() == list(range(5, 31, 5)) and curve["value"].to_list() == pytest.approx(losses[4::5])
    ckpts = cat.sql(f"SELECT * FROM training_checkpoints WHERE run_id = '{run_dir.name}' ORDER BY step").to_dicts()
    assert [(c["step"], c["policy_version"]) for c in ckpts] == [(15, 1), (30, 2)]

    # from the checkpoint: run -> dataset version -> exactly the events it was built from
    ckpt = Path(ckpts[-1]["checkpoint"])
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "config.json").is_file()
    assert main(klong(s, "lineage", str(ckpt), "--json")) == 0
    trace = json.loads(capsys.readouterr().out)
    assert trace["run_id"] == run_dir.name and trace["dataset"] == "sft@1" and trace["hash_ok"]
    n_input = cat.scalar(f"SELECT count(*) FROM step_events WHERE {trace['events_where']}")
    n_dataset = cat.scalar("SELECT count(*) FROM steps WHERE rollout_id IN "
                           "(SELECT rollout_id FROM samples WHERE dataset = 'sft' AND version = 1)")
    assert n_input == n_dataset > 0


def test_rl_continues_from_the_sft_checkpoint(train_home, capsys):
    s = train_home
    assert main(klong(s, "train", "--dataset", "sft@1", "--mode", "sft", "--config", "sft_tiny", *FAST,
                      "train.max_steps=3", "lineage=false")) == 0
    ckpt = sorted((run_dir_of(capsys.readouterr().out) / "checkpoints").iterdir())[-1]
    # accumulation 3 runs into the epoch's end: its last step is padded with empty micro-batches
    assert main(klong(s, "train", "--dataset", "rl@1", "--config", "rl_tiny", *FAST, f"model.name={ckpt}",
                      "engine.gradient_accumulation_steps=3", "loss.kl_estimator=full")) == 0
    run_dir = run_dir_of(capsys.readouterr().out)
    steps = steps_of(run_dir)
    assert steps[1]["kl"] == pytest.approx(0, abs=1e-6)  # the reference is the starting policy
    assert steps[2]["kl"] > 0
    # old logprobs recomputed by the input policy: r = 1 before any update; the stored (simulated) behaviour
    # logprobs are far from the tiny model's, which only the mismatch metric shows
    assert steps[1]["ratio_mean"] == pytest.approx(1, abs=1e-5) and steps[1]["ratio_max"] == pytest.approx(1, abs=1e-4)
    assert steps[1]["clip_frac"] == 0 and steps[1]["mismatch"] > 0.1 and steps[1]["entropy"] > 0
    assert steps[2]["ratio_mean"] != pytest.approx(1, abs=1e-7)
    assert sum(steps[k]["samples"] for k in steps) == 30 and steps[len(steps)]["samples"] < steps[1]["samples"]
    assert all(np.isfinite(steps[k]["loss"]) and 0 <= steps[k]["clip_frac"] <= 1 for k in steps)
    state = json.loads((sorted((run_dir / "checkpoints").iterdir())[-1] / "klong_state.json").read_text())
    assert state["policy_version_in"] == 1 and state["policy_version"] == 2 and state["dataset"] == "rl@1"


@pytest.mark.timeout(900)  # a 2-process DeepSpeed launch and a second training
def test_two_deepspeed_processes_match_one(train_home, capsys):
    """2 processes x accumulation 1 (ZeRO-2) vs 1 process x accumulation 2 (alone: stage 0, the engine's own
    clipping): the same steps, the same losses and gradient norms."""
    s = train_home
    common = ["--dataset", "rl@1", "--config", "rl_tiny", *FAST, "train.max_steps=4", "engine.zero_stage=2",
              "lineage=false"]
    assert main(klong(s, "train", *common, "--launcher", "deepspeed", "--nproc", "2")) == 0
    two = steps_of(run_dir_of(capsys.readouterr().out))
    assert main(klong(s, "train", *common, "engine.gradient_accumulation_steps=2")) == 0
    out = capsys.readouterr().out
    assert "1 process(es), ZeRO-0," in out  # alone there is nothing to partition: stage 0 (its own clipping)
    one = steps_of(run_dir_of(out))
    assert sorted(two) == sorted(one) == [1, 2, 3, 4]
    for k in one:
        assert two[k]["sample_keys"] == one[k]["sample_keys"]
        assert two[k]["loss"] == pytest.approx(one[k]["loss"], rel=1e-4, abs=1e-6)
        assert two[k]["grad_norm"] == pytest.approx(one[k]["grad_norm"], rel=1e-3, abs=1e-7)


@pytest.mark.timeout(900)  # three trainings, one a CLI start: minutes on a loaded 2-core machine
def test_killed_run_resumes_with_the_same_order_and_weights(train_home, capsys):
    s = train_home
    args = ["--dataset", "sft@1", "--mode", "sft", "--config", "sft_tiny", *FAST, "train.epochs=3",
            "train.max_steps=12", "train.save_every=4"]
    assert main(klong(s, "train", *args, "lineage=false")) == 0
    ref_dir = run_dir_of(capsys.readouterr().out)
    reference = steps_of(ref_dir)

    before = set((s.home / "runs").iterdir())
    proc = subprocess.Popen([sys.executable, "-m", "klong", *klong(s, "train", *args)], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = None
    deadline = time.monotonic() + 600  # returns at the checkpoint; a loaded machine imports torch for a minute
    while time.monotonic() < deadline and proc.poll() is None:
        found = list((s.home / "runs").glob("*/checkpoints/step-4/klong_state.json"))
        found = [f for f in found if f.parents[2] not in before]
        if found:
            run_dir = found[0].parents[2]
            break
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert run_dir is not None, proc.stdout.read()
    done = max(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step-*") if p.name[5:].isdigit())
    assert done < 12, "the run finished before it could be killed"

    assert main(klong(s, "train", "--resume", str(run_dir))) == 0  # its own config.yaml
    assert run_dir_of(capsys.readouterr().out) == run_dir
    resumed = steps_of(run_dir)
    assert sorted(resumed) == list(range(1, 13))
    for k in range(done + 1, 13):
        assert resumed[k]["sample_keys"] == reference[k]["sample_keys"]
        assert resumed[k]["loss"] == pytest.approx(reference[k]["loss"], rel=1e-5)
    a = load_file(str(run_dir / "checkpoints" / "step-12" / "model.safetensors"))
    b = load_file(str(ref_dir / "checkpoints" / "step-12" / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.allclose(a[k], b[k], atol=1e-6) for k in a)

    Sink(s).run(until_idle=True, idle_s=0.3)
    run = Catalog(s).sql(f"SELECT * FROM training_runs WHERE run_id = '{run_dir.name}'").to_dicts()[0]
    assert run["status"] == "finished" and run["n_resumes"] == 1 and run["steps"] == 12
    assert run["policy_version_out"] == 3  # checkpoints at 4, 8, 12
