"""trainer.data: the reader of a dataset version and the batch plan (order, packing, sharding, resume).

The datasets are built by the real path: events -> the session's Tansu broker -> real Sink -> Parquet archive
-> `consumers.materialize.build_version` (the `train_home` fixture, shared by the trainer tests). Their
token streams are learnable on purpose: an assistant step counts up from a random start (t, t+1, ...),
observations are noise from the upper half of a 512-token vocabulary, so the tiny model's loss can fall.
"""

from __future__ import annotations

import shutil
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest

from consumers.materialize import build_version
from consumers.sink import Sink
from services.broker import ensure_topics
from core.settings import Settings, Topics
from schemas.arrow import encode_array
from schemas.errors import ConfigError
from schemas.events import (JudgeResult, JudgeResultPayload, RolloutEnded, RolloutEndedPayload, RolloutStarted,
                            RolloutStartedPayload, Step, StepPayload, new_event)
from store.datasets import DatasetError, open_version, version_dir
from tests.helpers import produce
from tests.test_materialize import task
from trainer.data import BatchPlan, DatasetReader, Position

VOCAB = 512
DS_CONFIG = {"max_tokens": 400, "overlap_turns": 1}


def learnable_rollout(rid: str, turns: int, *, seed: int, group: str, score: float, text_only_step: int = -1):
    """start, pinned system + user prefix, `turns` x (tool output, assistant action), judge result, end."""
    rng = np.random.default_rng(seed)
    evs = [new_event(RolloutStarted, rollout_id=rid, payload=RolloutStartedPayload(
        task_id="task-a", group_id=group, timeout_s=3600.0))]
    steps = [("system", np.arange(20) + 300), ("user", rng.integers(256, VOCAB, 30))]
    for _ in range(turns):
        steps.append(("tool", rng.integers(256, VOCAB, int(rng.integers(8, 30)))))
        start = int(rng.integers(0, 200))
        steps.append(("assistant", np.arange(start, start + int(rng.integers(8, 40)))))
    for i, (role, ids) in enumerate(steps):
        asst = role == "assistant"
        text = i == text_only_step
        evs.append(new_event(Step, rollout_id=rid, payload=StepPayload(
            step_idx=i, role=role, content=f"{role} {i}", pinned=i < 2, context_start=2 if seed % 2 == 0 else None,
            token_ids=None if text else encode_array(ids.astype(np.int32), "int32"),
            logprobs=encode_array(-0.1 - rng.random(len(ids)), "float32") if asst and not text else None)))
    evs.append(new_event(JudgeResult, rollout_id=rid, payload=JudgeResultPayload(
        request_id=f"{rid}-j", step_idx=len(steps) - 1, judge_model="test", score=score, valid=True)))
    evs.append(new_event(RolloutEnded, rollout_id=rid, payload=RolloutEndedPayload(status="finished", n_steps=len(steps))))
    return evs


@pytest.fixture(scope="session")
def train_home(broker, tmp_path_factory) -> Settings:
    """A home with `sft@1` and `rl@1` (12 rollouts in 3 groups, ~40 windows of <= 400 tokens each)."""
    settings = Settings(home=tmp_path_factory.mktemp("trainer") / "home", bootstrap_servers=broker.bootstrap,
                        topics=Topics(f"t{uuid.uuid4().hex[:10]}"), partitions=2)
    settings.home.mkdir(parents=True)
    ensure_topics(settings)
    events = [task("task-a")]
    for r in range(12):
        events += learnable_rollout(f"r{r:02d}", 14 + r % 5, seed=r, group=f"g{r % 3}", score=(r % 4) / 4,
                                    text_only_step=9 if r == 5 else -1)
    produce(settings, events)
    Sink(settings).run(until_idle=True, idle_s=0.3)
    build_version(settings.home, "sft", "sft", DS_CONFIG)
    build_version(settings.home, "rl", "rl", DS_CONFIG)
    return settings


def test_reader_matches_the_dataset_layer(train_home):
    for ref in ("sft@1", "rl@1"):
        reader = DatasetReader(train_home.home, ref)
        theirs = list(open_version(train_home.home, ref, verify=False))
        assert len(reader) == len(theirs) > 20
        for j, s in enumerate(theirs):
            ids, mask = reader.sample(j)
            assert reader.sample_key(j) == f"{s.rollout_id}/{s.window_idx}"
            np.testing.assert_array_equal(ids, s.input_ids)
            np.testing.assert_array_equal(mask, s.loss_mask)
            mb = reader.batch(np.array([j]))
            want = mask.copy()
            want[0] = 0  # nothing predicts position 0
            if s.logprobs is not None:  # rl: no behaviour logprob (text-only step) -> not trained
                want[np.isnan(s.logprobs)] = 0
                np.testing.assert_array_equal(mb.logprobs[0][want > 0], s.logprobs[want > 0])
                np.testing.assert_array_equal(mb.logprobs[0][np.isnan(s.logprobs)], 0)
                np.testing.assert_allclose(mb.advantage[0], want * np.float32(s.advantage), rtol=1e-6)
            np.testing.assert_array_equal(mb.loss_mask[0], want)
            assert reader.trainable[j] == want.sum()
    rl = DatasetReader(train_home.home, "rl@1")
    assert rl.n_no_logprob.sum() > 0  # rollout r05 has a text-only assistant step


def test_same_context_flags_and_recomputed_old_logprobs_keep_tokens_without_a_behaviour_logprob(train_home):
    """Per token: same_ctx = the builder's span_same_ctx / prefix_same_ctx expanded over the span's tokens (even
    rollouts record context_start = 2, the prefix end: their first window is the generation context, later windows
    start elsewhere); with need_behaviour=False the text-only assistant step stays in the loss."""
    rl = DatasetReader(train_home.home, "rl@1", need_behaviour=False)
    samples = pq.read_table(rl.path / "samples.parquet").to_pylist()
    tokens = {r["rollout_id"]: r for r in pq.read_table(rl.path / "tokens.parquet").to_pylist()}
    theirs = list(open_version(train_home.home, "rl@1", verify=False))
    seen = set()
    for j, (row, s) in enumerate(zip(samples, theirs)):
        off = tokens[row["rollout_id"]]["step_offsets"]
        n_prefix = off[tokens[row["rollout_id"]]["prefix_len"]] - off[0]
        want = [row["prefix_same_ctx"]] * n_prefix
        for a, b, flag in zip(row["span_start"], row["span_end"], row["span_same_ctx"]):
            want += [flag] * (b - a)
        mb = rl.batch(np.array([j]))
        np.testing.assert_array_equal(mb.same_ctx[0], np.array(want, np.uint8))
        np.testing.assert_array_equal(mb.has_logprob[0], ~np.isnan(s.logprobs))
        mask = s.loss_mask.copy()
        mask[0] = 0
        np.testing.assert_array_equal(mb.loss_mask[0], mask)  # no-logprob tokens trained: old logprobs recomputed
        assert rl.trainable[j] == mask.sum()
        seen.add((int(row["rollout_id"][1:]) % 2, row["window_idx"] == 0, bool(mb.same_ctx[0].all())))
    assert (0, True, True) in seen and (0, False, False) in seen and (1, True, False) in seen


def test_micro_batches_pad_and_respect_the_token_budget(train_home):
    reader = DatasetReader(train_home.home, "rl@1")
    mb = reader.batch(np.array([0, 1, 2]))
    width = int(reader.lengths[[0, 1, 2]].max())
    assert mb.input_ids.shape == mb.loss_mask.shape == mb.advantage.shape == mb.logprobs.shape == (3, width)
    assert mb.input_ids.dtype == np.int32 and mb.loss_mask.dtype == np.uint8 and mb.logprobs.dtype == np.float32
    for i, j in enumerate([0, 1, 2]):
        n = reader.lengths[j]
        np.testing.assert_array_equal(mb.input_ids[i, :n], reader.sample(j)[0])
        assert not mb.input_ids[i, n:].any() and not mb.loss_mask[i, n:].any()
    plan = BatchPlan(reader, 1000, seed=3)
    for group in plan.microbatches(0):
        assert len(group) * reader.lengths[group].max() <= 1000
    with pytest.raises(ConfigError, match="micro_batch_tokens"):
        BatchPlan(reader, 100)


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 1), (3, 2)])
def test_every_sample_once_per_epoch_across_ranks(train_home, world, accum):
    reader = DatasetReader(train_home.home, "sft@1", verify=False)
    plans = [BatchPlan(reader, 1200, seed=7, rank=r, world_size=world, accumulation=accum) for r in range(world)]
    per_rank = [list(p.steps(epochs=2)) for p in plans]
    assert len({len(s) for s in per_rank}) == 1  # lockstep: same number of steps on every rank
    assert len(per_rank[0]) == plans[0].total_steps(2) and plans[0].total_steps(2, max_steps=3) == 3
    for epoch in (0, 1):
        seen = [int(j) for steps in per_rank for st in steps if st.epoch == epoch
                for mb in st.micro_batches for j in mb.samples]
        assert sorted(seen) == list(range(len(reader)))
    for steps in per_rank:
        assert all(len(st.micro_batches) == accum for st in steps)
    # the step totals are global: the same on every rank
    assert [s.totals for s in per_rank[0]] == [s.totals for s in per_rank[-1]]
    # a new epoch reshuffles; the same seed gives the same order
    assert not np.array_equal(plans[0].order(0), plans[0].order(1))
    assert np.array_equal(plans[0].order(1), BatchPlan(reader, 1200, seed=7).order(1))


def test_steps_do_not_depend_on_how_they_are_split(train_home):
    """1 process x accumulation 2 and 2 processes x accumulation 1 see the same optimizer steps."""
    reader = DatasetReader(train_home.home, "rl@1", verify=False)
    one = list(BatchPlan(reader, 1200, seed=1, accumulation=2).steps(epochs=1))
    two = [list(BatchPlan(reader, 1200, seed=1, rank=r, world_size=2).steps(epochs=1)) for r in range(2)]
    assert [s.samples.tolist() for s in one] == [s.samples.tolist() for s in two[0]]
    for k, st in enumerate(one):
        assert [m.samples.tolist() for m in st.micro_batches] == \
            [two[0][k].micro_batches[0].samples.tolist(), two[1][k].micro_batches[0].samples.tolist()]


def test_resume_position_continues_the_same_order(train_home):
    reader = DatasetReader(train_home.home, "sft@1", verify=False)
    plan = BatchPlan(reader, 1200, seed=5, accumulation=2)
    full = list(plan.steps(epochs=3))
    cut = 7
    again = list(BatchPlan(reader, 1200, seed=5, accumulation=2).steps(full[cut - 1].position, epochs=3))
    assert [s.samples.tolist() for s in again] == [s.samples.tolist() for s in full[cut:]]
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        next(BatchPlan(reader, 1200, seed=5, accumulation=3).steps(Position(0, 2)))


def test_refuses_a_version_whose_files_do_not_match_the_manifest(train_home, tmp_path):
    home = tmp_path / "copy"
    shutil.copytree(train_home.home / "datasets", home / "datasets")
    path = version_dir(home, "sft", 1) / "samples.parquet"
    t = pq.read_table(path)
    pq.write_table(t.slice(1), path)  # one window fewer
    with pytest.raises(DatasetError, match="content hash"):
        DatasetReader(home, "sft@1")


@pytest.mark.parametrize("reduction", ["token", "sample", "sample_sum"])
def test_equal_group_weight_gives_every_group_of_a_step_the_same_share(train_home, reduction):
    """loss.group_weight: equal -> each group's windows (or tokens) in a step weigh 1/G of it, whatever their
    number; windows (the default) leaves the weights out, so a group weighs by its windows or tokens."""
    reader = DatasetReader(train_home.home, "rl@1", verify=False)
    assert all(mb.weight is None for step in BatchPlan(reader, 1200, reduction=reduction).steps(epochs=1)
               for mb in step.micro_batches)
    size = reader.trainable if reduction == "token" else np.ones(len(reader), np.int64)
    uneven = 0
    for step in BatchPlan(reader, 1200, accumulation=3, group_weight="equal", reduction=reduction).steps(epochs=1):
        share, natural = {}, {}
        for mb in step.micro_batches:
            assert mb.empty or len(mb.weight) == len(mb.samples)  # an epoch's padding batch has no samples
            for j, w in zip(mb.samples.tolist(), [] if mb.empty else mb.weight.tolist()):
                g = int(reader.group[j])
                share[g] = share.get(g, 0.0) + w * size[j]
                natural[g] = natural.get(g, 0) + size[j]
        total = step.totals.loss_tokens if reduction == "token" else step.totals.samples
        assert [v / total for v in share.values()] == pytest.approx([1 / len(share)] * len(share))
        uneven += len(set(natural.values())) > 1  # groups of unequal size in this step
    assert uneven
