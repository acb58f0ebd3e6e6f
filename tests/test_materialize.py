"""The dataset builder (consumers.materialize) over a real Parquet archive and real DuckDB.

The archive here is written by the sink's own flush code (`store.flush.run_flush`: decode, Arrow,
offset-named directory, atomic rename) without a broker, so hypothesis can build hundreds of small
datasets in seconds. The Kafka path end to end is in test_datasets.py / test_replay.py.
"""

from __future__ import annotations

import datetime as dt
import tempfile
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings as hsettings
from hypothesis import strategies as st

from consumers.materialize import DatasetConfig, build_version
from consumers.split import SplitConfig, split_rollout
from store.windows import materialize
from core.settings import Settings, Topics
from schemas.arrow import encode_array, to_table
from schemas.errors import ConfigError
from schemas.events import (JudgeResult, JudgeResultPayload, RolloutEnded, RolloutEndedPayload, RolloutResumed,
                            RolloutResumedPayload, RolloutStarted, RolloutStartedPayload, Step, StepPayload, TaskPayload, TaskRegistered, decode, encode,
                            event_type, key_of, new_event)
from store.archive import write_flush
from store.datasets import open_version

T0 = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)


def archive(settings: Settings, events, flush_size: int = 40) -> None:
    """Events -> archive as the sink writes it (wire JSON decoded, `schemas.arrow` tables, offset-named
    flush directories via `store.archive.write_flush`), `flush_size` events per flush, 3 partitions."""
    by_tp = defaultdict(list)
    for ev in events:
        by_tp[(settings.topics.for_event(ev), zlib.crc32(key_of(ev).encode()) % 3)].append(decode(encode(ev)))
    for (topic, part), evs in by_tp.items():
        start = len(list((settings.archive_dir / topic).rglob(f"{topic}+{part}+*"))) * 100_000
        for lo in range(0, len(evs), flush_size):
            by_type = defaultdict(list)
            for i, ev in enumerate(evs[lo:lo + flush_size]):
                by_type[event_type(ev)].append((ev, topic, part, start + lo + i))
            n = min(flush_size, len(evs) - lo)
            write_flush(settings.archive_dir, topic, "t0", part, start + lo, start + lo + n - 1,
                        {t: to_table(t, items)[0] for t, items in by_type.items()})


def task(task_id: str, split: str = "train"):
    return new_event(TaskRegistered, produced_at=T0, payload=TaskPayload(task_id=task_id, title=task_id, split=split))


def rollout(rid: str, roles, n_tok, pinned=(), *, task_id="task-a", group="g0", score=0.5, end="finished",
            seed=0, policy_version=0, text_only=()):
    """Events of one rollout with the given roles and token counts; token ids/logprobs drawn from `seed`."""
    rng = np.random.default_rng(seed)
    evs = [new_event(RolloutStarted, rollout_id=rid, produced_at=T0, payload=RolloutStartedPayload(
        task_id=task_id, group_id=group, timeout_s=3600.0, policy_version=policy_version))]
    tokens = []
    for i, (role, n) in enumerate(zip(roles, n_tok)):
        ids = rng.integers(0, 50_000, n, dtype=np.int32)
        tokens.append(ids)
        text = i in text_only
        evs.append(new_event(Step, rollout_id=rid, produced_at=T0 + dt.timedelta(seconds=i), payload=StepPayload(
            step_idx=i, role=role, content="é" * (n // 2) + "x" * (n % 2) if text else f"step {i}",
            token_ids=None if text else encode_array(ids, "int32"),
            logprobs=encode_array(-rng.random(n), "float32") if role == "assistant" and not text else None,
            pinned=i in pinned, policy_version=policy_version)))
    if score is not None:
        evs.append(new_event(JudgeResult, rollout_id=rid, produced_at=T0 + dt.timedelta(hours=1), payload=JudgeResultPayload(
            request_id=f"{rid}-j", step_idx=len(roles) - 1, judge_model="m", score=score, valid=True)))
    if end:
        evs.append(new_event(RolloutEnded, rollout_id=rid, produced_at=T0 + dt.timedelta(hours=1),
                             payload=RolloutEndedPayload(status=end, n_steps=len(roles))))
    return evs, tokens


def home_settings(path: Path) -> Settings:
    return Settings(home=path, bootstrap_servers="unused:9", topics=Topics("t"))


# ---- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg, words", [
    ({"max_tokenz": 10}, "max_tokenz"), ({"max_tokens": 0}, "max_tokens"), ({"overlap_turns": -1}, "overlap_turns"),
    ({"reward_mode": "best"}, "reward_mode"), ({"prefix_loss": "sometimes"}, "prefix_loss"),
    ({"max_staleness": -2}, "max_staleness"), ({"std_normalize": "yes"}, "std_normalize"),
    ({"stage": 0}, "stage"), ({"statuses": ["done"]}, "statuses"), ({"tasks": [3]}, "tasks"),
])
def test_bad_config_names_the_key(cfg, words):
    with pytest.raises(ConfigError, match=words):
        DatasetConfig.from_mapping(cfg)


def test_config_normalizes_and_round_trips():
    cfg = DatasetConfig.from_mapping({"max_tokens": 4096, "stage": 2, "tasks": "t1", "statuses": "finished"})
    assert (cfg.stage, cfg.tasks, cfg.statuses) == ((2,), ("t1",), ("finished",))
    assert DatasetConfig.from_mapping(cfg.to_dict()) == cfg


# ---- the rules, table-driven ----------------------------------------------------------------------

ROLES = ["system", "user"] + ["tool", "assistant"] * 6  # prefix = steps 0, 1


def build(tmp_path, events, kind="rl", name="d", **cfg):
    s = home_settings(tmp_path)
    archive(s, events)
    out = build_version(s.home, name, kind, {"max_tokens": 200, "overlap_turns": 1, **cfg})
    return out.manifest, open_version(s.home, out.ref)


def test_window_reward_mode_and_staleness(tmp_path):
    evs, _ = rollout("r1", ROLES, [30, 20] + [15, 10] * 6, pinned=(0, 1), policy_version=1)
    old, _ = rollout("r0", ROLES, [30, 20] + [15, 10] * 6, pinned=(0, 1), policy_version=0, score=0.1)
    judge = [new_event(JudgeResult, rollout_id="r1", produced_at=T0 + dt.timedelta(minutes=k), payload=JudgeResultPayload(
        request_id=f"j{k}", step_idx=step, judge_model="m", score=s, valid=True)) for k, (step, s) in enumerate([(5, 0.2), (9, 0.4)])]
    m, v = build(tmp_path, [task("task-a")] + evs + old + judge, reward_mode="window", max_staleness=0, max_tokens=110)
    got = {(s.rollout_id, s.window_idx): s.q for s in v}
    assert {r for r, _ in got} == {"r1"} and m["drops"]["stale"]["count"] > 0  # r0 acted with policy 0 < 1
    table = v.samples().to_pylist()
    for row in table:  # window mode: the latest valid result at or before the window's last step
        expect = 0.5 if row["last_step"] >= 13 else 0.4 if row["last_step"] >= 9 else 0.2 if row["last_step"] >= 5 else None
        assert row["q"] == expect
    # measured from the trainer: policy 2 makes r1 (policy 1) one version stale too
    m, v = build(tmp_path / "t2", [task("task-a")] + evs + old + judge, reward_mode="window", max_staleness=0,
                 max_tokens=110, trainer_policy_version=2)
    assert len(v.samples()) == 0 and m["drops"]["stale"]["count"] > 0
    m, v = build(tmp_path / "t3", [task("task-a")] + evs + old + judge, reward_mode="window", max_staleness=1,
                 max_tokens=110, trainer_policy_version=2)
    assert {r["rollout_id"] for r in v.samples().to_pylist()} == {"r1"}
    assert {r["staleness"] for r in v.samples().to_pylist()} == {1}


def test_statuses_text_only_and_trailing(tmp_path):
    ok, _ = rollout("ok", ROLES + ["tool"], [30, 20] + [15, 10] * 6 + [5], pinned=(0, 1), text_only=(3, 4))
    err, _ = rollout("err", ROLES, [30, 20] + [15, 10] * 6, pinned=(0, 1), end="error")
    m, v = build(tmp_path, [task("task-a")] + ok + err, kind="sft")
    assert m["drops"]["status_error"]["count"] == 1 and m["drops"]["trailing_observations"]["count"] == 1
    first = next(iter(v))
    # steps 3 and 4 were text only: tokenized with the byte tokenizer ("é" is two bytes); prefix 50 + step 2 15
    assert first.input_ids[65:75].tolist() == list("é".encode() * 5)
    assert first.input_ids[75:90].tolist() == list("é".encode() * 7 + b"x")
    assert first.loss_mask[65:75].all() and not first.loss_mask[75:90].any()
    assert np.isnan(first.q) and np.isnan(first.advantage) and first.logprobs is None  # sft


def test_constant_groups_dropped_only_when_asked(tmp_path):
    a, _ = rollout("a", ROLES, [30, 20] + [15, 10] * 6, pinned=(0, 1), group="same", score=0.5)
    b, _ = rollout("b", ROLES, [30, 20] + [15, 10] * 6, pinned=(0, 1), group="same", score=0.5, seed=1)
    c, _ = rollout("c", ROLES, [30, 20] + [15, 10] * 6, pinned=(0, 1), group="mixed", score=1.0)
    d, _ = rollout("d", ROLES, [30, 20] + [15, 10] * 6, pinned=(0, 1), group="mixed", score=0.0, seed=1)
    m, v = build(tmp_path, [task("task-a")] + a + b + c + d, drop_constant_groups=True, std_normalize=True)
    assert {s.rollout_id for s in v} == {"c", "d"} and m["drops"]["constant_group"]["count"] > 0
    assert {round(s.advantage, 4) for s in v} == {1.0, -1.0}  # (Q - mean) / std over the group


def test_explicit_eval_or_unknown_task_is_an_error(tmp_path):
    evs, _ = rollout("r", ROLES, [30, 20] + [15, 10] * 6, pinned=(0, 1), task_id="paper-eval")
    s = home_settings(tmp_path)
    archive(s, [task("paper-eval", "eval"), task("task-a")] + evs)
    with pytest.raises(ConfigError, match="eval task"):
        build_version(s.home, "d", "sft", {"tasks": ["paper-eval"]})
    with pytest.raises(ConfigError, match="not a registered task"):
        build_version(s.home, "d", "sft", {"tasks": ["nope"]})
    out = build_version(s.home, "d", "sft", {})
    assert out.manifest["counts"]["samples"] == 0 and out.manifest["drops"]["eval_task"]["count"] == 1


# ---- properties over random trajectories ----------------------------------------------------------


@st.composite
def trajectories(draw):
    rollouts = []
    for r in range(draw(st.integers(1, 4))):
        roles, pinned = [], []
        for k in range(draw(st.integers(0, 3))):  # pinned prefix: system, user, maybe a pinned action
            roles.append(["system", "user", "assistant"][k])
            pinned.append(len(roles) - 1)
        for _ in range(draw(st.integers(1, 10))):
            roles += ["tool"] * draw(st.integers(0, 2)) + ["assistant"]
        roles += ["tool"] * draw(st.integers(0, 1))  # trailing observation
        n_tok = draw(st.lists(st.integers(0, 40), min_size=len(roles), max_size=len(roles)))
        rollouts.append((roles, n_tok, tuple(pinned[-1:] if pinned else ())))
    cfg = {"max_tokens": draw(st.integers(20, 300)), "overlap_turns": draw(st.integers(0, 3)),
           "loss_on_overlap": draw(st.booleans()), "prefix_loss": draw(st.sampled_from(["first", "never", "always"]))}
    return rollouts, cfg


@hsettings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trajectories(), st.integers(0, 2**16))
def test_dataset_windows_equal_direct_split(traj, seed):
    rollouts, cfg = traj
    rng = np.random.default_rng(seed)
    events, truth = [task("task-a")], {}
    for i, (roles, n_tok, pinned) in enumerate(rollouts):
        evs, tokens = rollout(f"r{i}", roles, n_tok, pinned, group=f"g{i // 2}", seed=seed + i,
                              score=round(float(rng.random()), 3))
        events += evs
        truth[f"r{i}"] = (roles, n_tok, pinned, tokens)
    with tempfile.TemporaryDirectory() as d:
        s = home_settings(Path(d))
        archive(s, events, flush_size=int(rng.integers(3, 30)))
        for kind in ("sft", "rl"):
            out = build_version(s.home, kind, kind, cfg)
            v = open_version(s.home, out.ref)
            got = {(x.rollout_id, x.window_idx): x for x in v}
            expect_n, used_tokens = 0, 0
            for rid, (roles, n_tok, pinned, tokens) in truth.items():
                pins = np.zeros(len(roles), bool)
                pins[list(pinned)] = True
                res = split_rollout(roles, pins, n_tok, SplitConfig(**cfg))
                for w in res.windows:
                    ids, mask = materialize(res, w, tokens)
                    x = got[(rid, w.window_idx)]
                    assert x.input_ids.tolist() == ids.tolist() and x.loss_mask.tolist() == mask.tolist()
                    assert len(ids) <= cfg["max_tokens"]
                    expect_n += 1
                if res.windows:  # stored once: the prefix plus the steps some window reads
                    used = set(range(res.prefix_len)) | {int(s) for w in res.windows for s in w.spans[:, 0]}
                    used_tokens += sum(n_tok[s] for s in used)
                if res.windows and sum(n_tok[res.prefix_len:]) <= res.budget:
                    assert len(res.windows) == 1  # K = 1 when the trajectory fits
            assert len(got) == expect_n and out.manifest["counts"]["tokens"] == used_tokens
            if kind == "rl" and got:
                adv = defaultdict(float)
                for x in got.values():
                    adv[x.group_id] += x.advantage
                    assert x.logprobs is not None and len(x.logprobs) == len(x.input_ids)
                assert all(abs(a) < 1e-9 for a in adv.values())  # group-relative: sums to 0 per group


def test_a_carried_over_rollout_is_baselined_against_its_siblings_from_the_earlier_iteration(tmp_path):
    """Group g: a (Q 1.0) and b (Q 0.0) ended in iteration 0; c was carried into iteration 1 (a rollout_resumed)
    and ended there with Q 0.2. Its iteration-1 build trains c alone, against the mean of all three:
    A(c) = 0.2 - (1.0 + 0.0 + 0.2) / 3 = -0.2 (it used to be 0: a group of one). Lone group h: A = 0, counted."""
    shape = dict(roles=ROLES, n_tok=[30, 20] + [15, 10] * 6, pinned=(0, 1))
    a, _ = rollout("a", **shape, group="g", score=1.0)
    b, _ = rollout("b", **shape, group="g", score=0.0, seed=1)
    c, _ = rollout("c", **shape, group="g", score=0.2, seed=2)
    lone, _ = rollout("h1", **shape, group="h", score=0.7, seed=3)
    resumed = new_event(RolloutResumed, rollout_id="c", produced_at=T0 + dt.timedelta(minutes=30),
                        payload=RolloutResumedPayload(iteration=1, policy_version=0, next_step_idx=7))
    resumed_h = new_event(RolloutResumed, rollout_id="h1", produced_at=T0 + dt.timedelta(minutes=30),
                          payload=RolloutResumedPayload(iteration=1, policy_version=0, next_step_idx=7))
    m, v = build(tmp_path, [task("task-a")] + a + b + c + [resumed] + lone + [resumed_h], iteration=1,
                 max_tokens=1000)
    rows = v.samples().to_pylist()
    assert {(r["rollout_id"], r["window_idx"]) for r in rows} == {("c", 0), ("h1", 0)}  # K = 1 each
    adv = {r["rollout_id"]: r["advantage"] for r in rows}
    assert adv["c"] == pytest.approx(0.2 - 1.2 / 3) and adv["h1"] == 0.0
    assert m["drops"]["iteration_filter"]["count"] == 2  # a and b: in the baseline, not in the dataset
    counts = m["counts"]
    assert (counts["groups"], counts["single_member_groups"], counts["single_member_windows"],
            counts["baseline_windows"]) == (2, 1, 1, 2)
    # iteration 0 alone: a and b against each other; c ended in a later iteration and never joins (a rebuild of
    # iteration 0 gives what its first build gave, when c was still running)
    m0, v0 = build(tmp_path / "i0", [task("task-a")] + a + b + c + [resumed], iteration=0, max_tokens=1000)
    assert {r["rollout_id"]: r["advantage"] for r in v0.samples().to_pylist()} == {"a": 0.5, "b": -0.5}
