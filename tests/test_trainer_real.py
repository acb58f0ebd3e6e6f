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


def record_completions(settings, server, chat, prompts_scores) -> None:
    """One-turn rollouts recorded token-in/token-out through the real vLLM server: the prompt is the chat
    template's ids of [system, user] + the generation header, sent as ids to /v1/completions; the assistant step
    holds the header ids (no behaviour logprob) and the sampled ids with their logprobs exactly as served.
    Every step says the model was given [0, P) ++ [2, step) (context_start=2): the window is its context."""
    from urllib import request

    from schemas.arrow import encode_array
    from schemas.events import (JudgeResult, JudgeResultPayload, RolloutEnded, RolloutEndedPayload, RolloutStarted,
                                RolloutStartedPayload, Step, StepPayload, new_event)

    events = [task_event("fre")]
    for i, (prompt, score) in enumerate(prompts_scores):
        rid = f"vllm-{i}"
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
        spans = chat.message_spans(msgs)
        header = [int(x) for x in chat.generation_prompt(msgs)]
        ids = [int(x) for s in spans for x in s] + header
        body = {"model": server.model_name, "prompt": ids, "max_tokens": 24, "temperature": 1.0, "seed": i,
                "logprobs": 0, "return_token_ids": True, "skip_special_tokens": False}
        req = request.Request(f"{server.base_url}/completions", data=json.dumps(body).encode(),
                              headers={"Content-Type": "application/json"})
        choice = json.load(request.urlopen(req, timeout=600))["choices"][0]
        out, lps = choice["token_ids"], choice["logprobs"]["token_logprobs"]
        assert len(out) == len(lps) > 0
        events.append(new_event(RolloutStarted, rollout_id=rid, payload=RolloutStartedPayload(
            task_id="fre", group_id="g", timeout_s=600.0, tokenizer=chat.fingerprint)))
        for k, (m, span) in enumerate(zip(msgs, spans)):
            events.append(new_event(Step, rollout_id=rid, payload=StepPayload(
                step_idx=k, role=m["role"], content=m["content"], pinned=True, context_start=2,
                token_ids=encode_array(np.asarray(span, np.int32), "int32"))))
        events.append(new_event(Step, rollout_id=rid, payload=StepPayload(
            step_idx=2, role="assistant", content=chat.decode(out), context_start=2,
            token_ids=encode_array(np.asarray(header + out, np.int32), "int32"),
            logprobs=encode_array(np.asarray([np.nan] * len(header) + lps, np.float32), "float32"))))
        events.append(new_event(JudgeResult, rollout_id=rid, payload=JudgeResultPayload(
            request_id=f"{rid}-j", step_idx=2, judge_model="test", score=score, valid=True)))
        events.append(new_event(RolloutEnded, rollout_id=rid, payload=RolloutEndedPayload(status="finished", n_steps=3)))
    produce(settings, events)


@pytest.mark.timeout(1200)
def test_first_rl_step_on_vllm_rollouts_has_ratio_one_and_the_trainer_reproduces_vllms_logprobs(
        make_settings, smollm2_dir, policy_server, capsys):
    from consumers.chat import ChatTokenizer

    s = make_settings()
    chat = ChatTokenizer(smollm2_dir)
    record_completions(s, policy_server, chat, [("Name a colour.", 1.0), ("Say one word.", 0.0),
                                                ("Count to three.", 0.5)])
    sink(s)
    out = build_version(s.home, "vllm-rl", "rl", {"max_tokens": 1024, "tokenizer": str(smollm2_dir)})
    assert out.manifest["counts"]["samples"] == 3
    capsys.readouterr()
    assert main(klong(s, "train", "--dataset", out.ref, "--config", "rl_smollm2", f"model.name={smollm2_dir}",
                      "data.micro_batch_tokens=1024", "data.shuffle=false", "train.max_steps=1", "lineage=false")) == 0
    first = steps_of(run_dir_of(capsys.readouterr().out))[1]
    # old logprobs recomputed by the input policy on the window's own input: r = 1, KL = 0 before any update
    assert first["ratio_mean"] == pytest.approx(1, abs=1e-3) and first["ratio_max"] == pytest.approx(1, abs=1e-3)
    assert first["kl"] == pytest.approx(0, abs=1e-6) and first["clip_frac"] == 0
    # every sampled token sits in its generation context, and a float32 server agrees with the trainer
    assert first["mismatch_tokens"] >= 3 and first["mismatch"] < 1e-3, first
    assert first["is_weight_mean"] == pytest.approx(1, abs=1e-2) and first["entropy"] > 0
