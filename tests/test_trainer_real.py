"""The trainer on the real model (SmolLM2-135M, the session's `smollm2_dir`): SFT on trajectories rendered with its
chat template lowers its loss through the real path (`klong train`, DeepSpeed engine) and checkpoints a directory
vLLM and transformers load as it is; RL on rollouts recorded through the real vLLM server starts at ratio 1
(old logprobs recomputed) with the trainer's logprobs equal to vLLM's where the contexts agree.
Tiny on purpose: < 1k training tokens, 2-3 steps (a step on 1k tokens takes ~10 s on 2 cores)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from consumers.materialize import build_version
from klong.cli import main
from tests.test_import import call, produce, sink, task_event
from tests.test_trainer_run import run_dir_of, steps_of

SYSTEM = "You are a careful engineer. Use the bash tool to work in the repository."


def teacher_row(i: int) -> dict:
    """A short trajectory with a tool call and its result (~150 tokens rendered)."""
    return {"task_id": "fre", "id": f"teacher-{i}", "score": 1.0, "messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Create the file notes{i}.txt with the word done in it."},
        {"role": "assistant", "content": "I'll write the file.",
         "tool_calls": [call(f"c{i}", "bash", cmd=f"echo done > notes{i}.txt")]},
        {"role": "tool", "tool_call_id": f"c{i}", "content": ""},
        {"role": "assistant", "content": f"The file notes{i}.txt now holds the word done."},
    ]}


def klong(settings, *args) -> list[str]:
    return [*args, "--home", str(settings.home), "--bootstrap-servers", settings.bootstrap_servers,
            "--topic-prefix", settings.topics.prefix]


@pytest.mark.timeout(1200)  # ~3 x 10 s of training on an idle 2-core machine; a shared, busy one is far slower
def test_sft_on_template_rendered_trajectories_lowers_the_real_models_loss(make_settings, smollm2_dir, tmp_path,
                                                                           capsys):
    s = make_settings()
    produce(s, [task_event("fre")])
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(teacher_row(i)) + "\n" for i in range(2)))
    assert main(klong(s, "import", "trajectories", str(tmp_path / "t.jsonl"), "--tokenizer", str(smollm2_dir))) == 0
    sink(s)
    out = build_version(s.home, "teacher", "sft", {"max_tokens": 1024, "tokenizer": str(smollm2_dir),
                                                   "prefix_loss": "always"})
    capsys.readouterr()
    # the whole dataset in one micro-batch, three steps over it: each step sees the same tokens
    assert main(klong(s, "train", "--dataset", out.ref, "--config", "sft_smollm2", f"model.name={smollm2_dir}",
                      "data.micro_batch_tokens=1024", "data.shuffle=false", "train.epochs=3", "train.max_steps=3",
                      "optim.lr=0.00005", "lineage=false")) == 0
    run_dir = run_dir_of(capsys.readouterr().out)
    steps = steps_of(run_dir)
    assert 200 < steps[1]["tokens"] <= 1024 and steps[1]["samples"] == 2
    losses = [steps[k]["loss"] for k in (1, 2, 3)]
    assert losses[2] < losses[1] < losses[0], losses
    assert 0.5 < losses[0] < 6  # a trained model on English: far below ln(49152) = 10.8

    # the checkpoint: step-3, a transformers directory with the input's tokenizer and (tool-aware) chat template
    ckpt = run_dir / "checkpoints" / "step-3"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (ckpt / name).is_file(), name
    assert (ckpt / "chat_template.jinja").read_text() == (Path(smollm2_dir) / "chat_template.jinja").read_text()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.data import BatchPlan, DatasetReader

    model = AutoModelForCausalLM.from_pretrained(ckpt, local_files_only=True, dtype=torch.float32)
    assert AutoTokenizer.from_pretrained(ckpt).chat_template == AutoTokenizer.from_pretrained(smollm2_dir).chat_template
    reader = DatasetReader(s.home, out.ref)
    (mb,) = next(BatchPlan(reader, 1024, shuffle=False).steps()).micro_batches
    ids = torch.from_numpy(mb.input_ids).long()
    labels = ids.masked_fill(torch.from_numpy(mb.loss_mask) == 0, -100)
    with torch.no_grad():
        after = model(input_ids=ids, labels=labels).loss.item()
    assert after < losses[2] < losses[0]  # the saved weights are the trained ones (one more update than step 3 saw)
    assert np.isfinite(after)

    # the same weights with another chat template made other ids: refused, naming both tokenizers
    other = tmp_path / "other-template"
    other.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        if (Path(smollm2_dir) / name).exists():
            (other / name).symlink_to(Path(smollm2_dir) / name)
    (other / "chat_template.jinja").write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    assert main(klong(s, "train", "--dataset", out.ref, "--config", "sft_smollm2", f"model.name={other}",
                      "train.max_steps=1", "lineage=false")) == 2
    assert f"dataset {out.ref} holds token ids from tokenizer" in capsys.readouterr().err


def record_rollouts(settings, tmp_path, smollm2_dir, server, scores, temperature: float = 1.0) -> None:
    """Rollouts of the reference runner, token-in/token-out through the real vLLM server (producers.agent with
    model_dir: the context kept as ids, the sampled ids and logprobs as sampled), 2 turns of <= 12 sampled tokens
    each, one group; then a judge result per rollout with the given scores. (The runner's system prompt and
    tools block make a prefix of ~1.7k tokens.)"""
    from producers.agent import AgentConfig, PolicyEndpoint, run_agent
    from producers.outbox import Outbox
    from producers.tasks import import_tasks
    from schemas.events import JudgeResult, JudgeResultPayload, new_event
    from tests.test_tasks import make_task

    import_tasks(settings, [make_task(tmp_path / "tasks", "tiny", paper="A tiny paper.\n")], "train")
    results = []
    with Outbox(settings) as outbox:
        for i, _ in enumerate(scores):
            config = AgentConfig(model_dir=str(smollm2_dir), mandatory_reading=False, max_turns=2, max_tokens=12,
                                 temperature=temperature, seed=i, sandbox="unsafe-local", reminder_every_turns=0)
            results.append(run_agent(outbox, settings, "tiny", PolicyEndpoint(server.base_url, server.model_name),
                                     timeout_s=900, group_id="g", config=config, judge=False))
    assert all(r.n_prunes == 0 and r.n_turns >= 1 for r in results), results
    produce(settings, [new_event(JudgeResult, rollout_id=r.rollout_id, payload=JudgeResultPayload(
        request_id=f"{r.rollout_id}-j", step_idx=0, judge_model="test", score=q, valid=True))
        for r, q in zip(results, scores)])


@pytest.mark.timeout(1500)
def test_first_rl_step_on_vllm_rollouts_has_ratio_one_and_the_trainer_reproduces_vllms_logprobs(
        make_settings, smollm2_dir, policy_server, tmp_path, capsys):
    s = make_settings()
    record_rollouts(s, tmp_path, smollm2_dir, policy_server, [0.5])  # one (~1.8k tokens): ratio and KL need no group
    sink(s)
    out = build_version(s.home, "vllm-rl", "rl", {"max_tokens": 4096, "tokenizer": str(smollm2_dir),
                                                  "statuses": ["finished", "timeout"]})
    assert out.manifest["counts"]["samples"] == 1
    capsys.readouterr()
    assert main(klong(s, "train", "--dataset", out.ref, "--config", "rl_smollm2", f"model.name={smollm2_dir}",
                      "data.micro_batch_tokens=4096", "data.shuffle=false", "train.max_steps=1", "lineage=false")) == 0
    first = steps_of(run_dir_of(capsys.readouterr().out))[1]
    # old logprobs recomputed by the input policy on the window's own input: r = 1, KL = 0 before any update
    assert first["ratio_mean"] == pytest.approx(1, abs=1e-3) and first["ratio_max"] == pytest.approx(1, abs=1e-3)
    assert first["kl"] == pytest.approx(0, abs=1e-6) and first["clip_frac"] == 0
    # the sampled tokens sit in their generation context, and a float32 server agrees with the trainer there
    assert first["mismatch_tokens"] >= 4 and first["mismatch"] < 1e-3, first
    assert first["is_weight_mean"] == pytest.approx(1, abs=1e-2) and first["entropy"] > 0


@pytest.mark.timeout(1500)
def test_at_temperature_0_7_the_trainer_reproduces_vllms_processed_logprobs_and_the_first_ratio_is_one(
        make_settings, smollm2_dir, policy_server, tmp_path, capsys):
    """Rollouts sampled at T = 0.7 (no grammar): the server's logprobs are those of softmax(logits / 0.7) (`klong
    serve`: processed_logprobs), the trainer takes its log-probs at the step's recorded temperature, and on
    same-context sampled tokens the two agree to 1e-3; the first RL step's ratio against those behaviour logprobs
    is 1. Only sampled ids are trained: the loss tokens are exactly the ids with a behaviour logprob."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.data import BatchPlan, DatasetReader
    from trainer.losses import head_logprobs
    from trainer.objective import hidden_and_head

    s = make_settings()
    record_rollouts(s, tmp_path, smollm2_dir, policy_server, [0.5], temperature=0.7)
    sink(s)
    out = build_version(s.home, "vllm-rl-t07", "rl", {"max_tokens": 4096, "tokenizer": str(smollm2_dir),
                                                      "statuses": ["finished", "timeout"]})
    reader = DatasetReader(s.home, out.ref)
    (mb,) = next(BatchPlan(reader, 4096, shuffle=False).steps()).micro_batches
    loss, has, same = mb.loss_mask[0] == 1, mb.has_logprob[0] == 1, mb.same_ctx[0] == 1
    # D1 and the header: the trained ids are the sampled ones (a behaviour logprob each), and every sampled id
    # after position 0 is trained; the template's ids (header, closing) are in the input without loss
    assert np.array_equal(loss[1:], has[1:]) and loss.sum() >= 4
    assert out.manifest["counts"]["assistant_markup_tokens"] > 0
    assert np.all(mb.temperature[0][loss] == np.float32(0.7))
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, local_files_only=True, dtype=torch.float32).eval()
    ids = torch.from_numpy(mb.input_ids).long()
    with torch.no_grad():
        hidden, head = hidden_and_head(model, ids)
        at_t, _ = head_logprobs(hidden, head, ids, chunk=0, temperature=torch.from_numpy(mb.temperature[:, 1:]))
        at_1, _ = head_logprobs(hidden, head, ids, chunk=0)
    on = (loss & same)[1:]  # aligned to the target token
    behaviour = torch.from_numpy(mb.logprobs[0, 1:])[torch.from_numpy(on)]
    assert on.sum() >= 4
    diff = (at_t[0][torch.from_numpy(on)] - behaviour).abs()
    assert diff.max().item() <= 1e-3, diff
    # the server's logprobs are the tempered ones: the raw (T = 1) log-probs differ from them
    assert (at_1[0][torch.from_numpy(on)] - behaviour).abs().max().item() > 1e-2
    capsys.readouterr()
    assert main(klong(s, "train", "--dataset", out.ref, "--config", "rl_smollm2", f"model.name={smollm2_dir}",
                      "data.micro_batch_tokens=4096", "data.shuffle=false", "train.max_steps=1", "lineage=false",
                      "loss.old_logprobs=behaviour", "loss.tis_cap=null")) == 0
    first = steps_of(run_dir_of(capsys.readouterr().out))[1]
    # the ratio's denominator is the sampler's own logprob: r = 1 before any update, nothing clipped
    assert first["ratio_mean"] == pytest.approx(1, abs=1e-3) and first["ratio_max"] == pytest.approx(1, abs=2e-3)
    assert first["clip_frac"] == 0, first
