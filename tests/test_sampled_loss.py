"""Only the ids the policy sampled carry loss, and the trainer takes their log-probs at the sampled temperature.

A recorded assistant step is its whole message in the context: the generation prompt `<|im_start|>assistant\\n`,
the sampled ids, and the template's closing ids (`\\n` after a sampled `<|im_end|>`, `<|im_end|>\\n` after a cut
sample). Windows keep all of it (well-formed chat text); the loss mask covers only the sampled ids, in recorded,
older (no counts: NaN logprobs) and imported (ids from the template, no counts) steps, in the trainer's reader,
the dataset layer and the exports alike. SmolLM2's real tokenizer and template (`smollm2_dir`); the policy is a
scripted stand-in answering token-in/token-out calls (the real vLLM path: tests/test_trainer_real.py).
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from core.chat import ChatTokenizer
from consumers.materialize import build_version
from producers.agent_config import AgentConfig
from producers.agent_context import TokenContext
from producers.agent_policy import TokenCompletion
from producers.agent_tools import TOOLS
from producers.outbox import Outbox
from producers.recorder import RolloutRecorder
from schemas.errors import ConfigError
from schemas.events import JudgeResult, JudgeResultPayload, new_event
from store.datasets import open_version
from tests.helpers import produce
from tests.test_import import sink, task_event
from trainer.data import BatchPlan, DatasetReader
from trainer.export import export_dataset

STOPPED = "Hello there."  # sampled with its end-of-turn id: <|im_end|> carries loss, the template's \n does not
CUT = "The essay begins with a"  # cut by max_tokens: the template's <|im_end|>\n carries no loss


@pytest.fixture(scope="module")
def chat(smollm2_dir):
    return ChatTokenizer(smollm2_dir)


class ScriptedPolicy:
    """Stand-in for the model behind /v1/completions: each call answers the next (sampled ids, finish_reason)."""

    def __init__(self, replies):
        self.replies = list(replies)

    def complete_tokens(self, prompt_ids, *, timeout_s, rollout_id):
        ids, finish = self.replies.pop(0)
        return TokenCompletion(list(ids), [-0.25] * len(ids), "", finish, list(prompt_ids))


def record(settings, chat, *, how: str, temperature: float = 0.7) -> str:
    """One rollout system, user (pinned), assistant (stopped), user, assistant (cut), recorded the runner's way.
    how: "counts" (today's runner), "nan" (an older runner: no counts, NaN logprobs on the template's ids),
    "ids" (an import with the template's ids and finish_reason, no counts, no logprobs)."""
    policy = ScriptedPolicy([(chat.encode(STOPPED).tolist() + [chat.eos_id], "stop"),
                             (chat.encode(CUT).tolist(), "length")])
    ctx = TokenContext(chat, TOOLS)
    with Outbox(settings) as outbox, RolloutRecorder(outbox, task_id="fre", group_id="g", timeout_s=60,
                                                     tokenizer=chat.fingerprint) as rec:
        for role, text, pinned in [("system", "You are terse.", True), ("user", "Say hello.", True),
                                   ("assistant", None, False), ("user", "Now write an essay.", False),
                                   ("assistant", None, False)]:
            step = rec.n_steps
            if role != "assistant":
                ids = ctx.observe({"role": role, "content": text}, step_idx=step, pinned=pinned)
                rec.observation(text, role=role, pinned=pinned, token_ids=ids, context_start=ctx.context_start(step))
                continue
            t = ctx.sample(policy, step_idx=step, pinned=False, timeout_s=60, rollout_id=rec.rollout_id)
            kw = dict(token_ids=t.token_ids, context_start=t.context_start)  # what an earlier runner recorded
            if how == "counts":
                kw.update(logprobs=t.logprobs, n_generation_prompt=t.n_generation_prompt, n_sampled=t.n_sampled,
                          finish_reason=t.finish_reason, temperature=temperature, top_p=1.0, top_k=-1)
            elif how == "nan":
                kw.update(logprobs=t.logprobs)
            else:
                kw.update(finish_reason=t.finish_reason)
            rec.action(t.text, **kw)
        rid = rec.rollout_id
    produce(settings, [new_event(JudgeResult, rollout_id=rid, payload=JudgeResultPayload(
        request_id=f"{rid}-j", step_idx=4, judge_model="test", score=1.0, valid=True))])
    return rid


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def _loss_texts(chat, ids, mask) -> list[str]:
    return [chat.decode(ids[a:b]) for a, b in _runs(mask)]


@pytest.mark.parametrize("how", ["counts", "nan", "ids"])
def test_only_sampled_ids_carry_loss_in_recorded_windows(make_settings, chat, smollm2_dir, tmp_path, how):
    settings = make_settings()
    produce(settings, [task_event("fre")])
    record(settings, chat, how=how)
    sink(settings)
    # "ids" steps (no counts, no logprobs) are masked by the template's markup: build with the model directory
    tok = {"tokenizer": str(smollm2_dir)} if how == "ids" else {}
    want = [STOPPED + "<|im_end|>", CUT]  # the header, the \n after a sampled <|im_end|>, a cut's <|im_end|>\n: no loss
    for kind in ("sft", "rl"):
        out = build_version(settings.home, f"d-{kind}", kind, {"max_tokens": 4096, **tok})
        reader = DatasetReader(settings.home, out.ref)
        assert len(reader) == 1
        ids, mask = reader.sample(0)
        text = chat.decode(ids)
        # the window is the whole conversation as the model saw it: well-formed chat text, markup included
        assert text.endswith(f"<|im_start|>assistant\n{CUT}<|im_end|>\n") and f"{STOPPED}<|im_end|>\n<|im_start|>user" in text
        assert _loss_texts(chat, ids, mask) == want, (kind, how)
        n_loss = pq.read_table(reader.path / "samples.parquet", columns=["n_loss_tokens"]).column(0).to_pylist()
        assert n_loss == [int(mask.sum())]
        markup = 2 * len(chat.encode("<|im_start|>assistant\n")) + len(chat.encode("\n<|im_end|>\n"))
        assert out.manifest["counts"]["assistant_markup_tokens"] == markup  # 2 headers, \n, <|im_end|>\n
        # the dataset layer's own iteration, and every export format, give the same mask
        (sample,) = list(open_version(settings.home, out.ref))
        assert np.array_equal(sample.input_ids, ids) and np.array_equal(sample.loss_mask, mask)
        rep = export_dataset(settings.home, out.ref, "trl", tmp_path / f"trl-{kind}-{how}")
        row = pq.read_table(rep.files[0]).to_pylist()[0]
        exported = np.array(row["assistant_masks"], np.uint8)
        assert _loss_texts(chat, np.array(row["input_ids"]), exported) == want
        if kind == "rl":
            # recompute mode (need_behaviour=False) trains every sampled id; recorded ones all have a logprob
            recompute = DatasetReader(settings.home, out.ref, need_behaviour=False)
            (mb,) = next(BatchPlan(recompute, 4096, shuffle=False).steps()).micro_batches
            on = mb.loss_mask[0] == 1
            assert _loss_texts(chat, mb.input_ids[0], mb.loss_mask[0]) == want
            assert mb.has_logprob[0][on].all() == (how != "ids")
            assert np.all(mb.temperature[0][on] == (np.float32(0.7) if how == "counts" else 1.0))


def test_older_archives_without_the_fields_still_build(make_settings, chat):
    """Steps recorded before the sampling fields existed (no columns in the archive at all) read as unknown."""
    settings = make_settings()
    produce(settings, [task_event("fre")])
    with Outbox(settings) as outbox, RolloutRecorder(outbox, task_id="fre", group_id="g", timeout_s=60) as rec:
        rec.observation("Say hello.", role="user", pinned=True, token_ids=chat.encode("<|im_start|>user\nSay hello.<|im_end|>\n"))
        ids = chat.encode("<|im_start|>assistant\nHello.<|im_end|>\n")
        h = len(chat.encode("<|im_start|>assistant\n"))  # an earlier runner: NaN on the header and the closing \n
        rec.action("Hello.", token_ids=ids, logprobs=[np.nan] * h + [-0.5] * (len(ids) - h - 1) + [np.nan])
    sink(settings)
    import pyarrow as pa

    # drop the new columns from the archived step file: an archive written before them
    files = list(settings.home.glob("archive/**/step.parquet"))
    assert files
    for f in files:
        t = pq.read_table(f)
        keep = [c for c in t.column_names if c not in ("n_generation_prompt", "n_sampled", "finish_reason",
                                                        "temperature", "top_p", "top_k")]
        pq.write_table(pa.Table.from_arrays([t.column(c) for c in keep], names=keep), f)
    out = build_version(settings.home, "old", "sft", {"max_tokens": 4096})
    ids_, mask = DatasetReader(settings.home, out.ref).sample(0)
    assert _loss_texts(chat, ids_, mask) == ["Hello.<|im_end|>"]


def test_recorder_refuses_counts_outside_the_step(make_settings):
    from schemas.errors import ValidationError

    settings = make_settings()
    with Outbox(settings) as outbox, RolloutRecorder(outbox, task_id="fre", group_id="g", timeout_s=60) as rec:
        with pytest.raises(ValidationError, match="n_generation_prompt=2 \\+ n_sampled=3"):
            rec.action("x", token_ids=[1, 2, 3, 4], n_generation_prompt=2, n_sampled=3)
        with pytest.raises(ValidationError, match="together"):
            rec.action("x", token_ids=[1, 2, 3, 4], n_sampled=3)


def test_rl_refuses_truncated_sampling():
    assert AgentConfig(temperature=0.7).check_rl().temperature == 0.7
    with pytest.raises(ConfigError, match="agent.top_p=0.9"):
        AgentConfig(top_p=0.9).check_rl()
    with pytest.raises(ConfigError, match="agent.top_k=40"):
        AgentConfig(top_k=40).check_rl()
    with pytest.raises(ConfigError, match="top_p must be in"):
        AgentConfig(top_p=0)
