"""Benchmark: training on exactly what the policy saw, on the real model (SmolLM2-135M, issue 10).

    .venv/bin/python bench/alignment.py [--model HOME/models/smollm2] [--loss-tokens 8192] [--sft-steps 4]

(a), (b) Rollouts recorded through the runner (token-in/token-out) with SmolLM2 served by vLLM, built into an
    RL dataset: the share of sampled tokens whose training context equals their generation context where
    it must, and mean |logp_trainer - logp_vllm| on them (bench/alignment_ab.py has the details).

(c) Peak memory of one RL loss step at 8k tokens, the trainer's way (log-probs and entropies in chunks of
    `loss.logit_chunk_tokens` positions under activation checkpointing, trainer.losses.head_logprobs) beside
    the full-logits way (one [1, T, V] float32 logits tensor per model, cross-entropy and entropy on it).
    The step is the part of an RL micro-batch that depends on the vocabulary: from the policy's last hidden
    states [1, T, 576] and the real output layer (49,152 x 576, SmolLM2's), the old logprobs recomputed by
    the frozen policy (no grad), the policy's log-probs and entropies, ratio, dual-clipped surrogate, k3 KL,
    backward into the hidden states and the output layer. The transformer layers below are the same either
    way and are left out (a full SmolLM2 step at 8k tokens needs ~25 GB here). Each way runs in its own
    subprocess; its peak is the process's maximum resident set minus its resident set just before the step.
    Goal: chunked <= 1/4 of full.
(d) Trainer SFT tokens/s (`klong train`'s recipe: DeepSpeed engine, dataset reader, chunked log-probs) beside
    a plain transformers training loop (model(input_ids, labels) with the same mask, torch AdamW, the same
    learning rate and gradient clipping) over the same micro-batches of the same dataset version, same
    threads, one plain step after each trainer step so both meet the same load; each side's figure is its
    fastest step after the first (warm-up) one, as contention on a shared machine only ever slows a step
    down. The trainer runs with `engine.zero_stage=1`, as the shipped SmolLM2 configs say (alone, the engine
    runs stage 0: trainer.engine). Goal: trainer >= 0.9x plain. The first-step losses of both are printed:
    they must agree (same model, same tokens, same mask).

The dataset for (d): an SFT version of a few short conversations, each step's token ids as the model
directory's chat template renders it (written straight into an archive, as bench/materialize.py does, then
built by the real builder), unless --home/--dataset name one (e.g. the RL version (a) builds).
One figure per line, with its peer measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.settings import Settings, Topics  # noqa: E402


def say(name: str, value: float, unit: str, note: str = "") -> None:
    print(f"{name:<52} {value:>14,.{4 if abs(value) < 1 else 2}f} {unit:<10} {note}", flush=True)


def default_model() -> Path:
    home = Path(os.environ.get("KLONG_HOME", "klong-data"))
    return home / "models" / "smollm2"


# ---- (c) peak memory of one RL loss step --------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _output_layer(model_dir: Path):
    """The model's output layer (tied: the input embedding) as a trainable Linear, read from safetensors alone."""
    import torch
    from safetensors import safe_open

    cfg = json.loads((model_dir / "config.json").read_text())
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        key = "lm_head.weight" if "lm_head.weight" in f.keys() else "model.embed_tokens.weight"
        w = f.get_tensor(key).float()
    head = torch.nn.Linear(cfg["hidden_size"], w.shape[0], bias=False)
    head.weight.data = w
    return head


def loss_step(model_dir: Path, tokens: int, chunk: int) -> int:
    """One RL loss step (see (c)); returns the peak resident bytes it added. chunk=0: the full-logits way."""
    import torch

    from trainer.losses import (Norm, head_logprobs, kl_k3, rl_loss, token_entropy, token_logprobs)

    torch.manual_seed(0)
    head = _output_layer(model_dir)
    h, v = head.in_features, head.out_features

    def run(t: int) -> None:
        hidden = torch.randn(1, t, h).mul_(0.5).requires_grad_(True)
        ref_hidden = hidden.detach() + 0.01 * torch.randn(1, t, h)
        ids = torch.randint(0, v, (1, t))
        behaviour = torch.full((1, t - 1), -2.0)
        adv, mask = torch.randn(1, t - 1), torch.ones(1, t - 1)
        if chunk:
            with torch.no_grad():
                old, _ = head_logprobs(ref_hidden, head, ids, chunk=chunk)
            logp, ent = head_logprobs(hidden, head, ids, chunk=chunk, entropy=True)
        else:
            with torch.no_grad():
                old = token_logprobs(head(ref_hidden), ids)
            logits = head(hidden)
            logp = token_logprobs(logits, ids)
            with torch.no_grad():
                ent = token_entropy(logits)
        loss, st = rl_loss(logp, old, adv, mask, Norm("token", t - 1, 1), clip_eps=0.2, dual_clip=3.0, beta=0.01,
                           kl=kl_k3(logp, old))
        loss.backward()
        assert torch.isfinite(loss) and float(ent.mean()) > 0 and (old - behaviour).abs().mean() >= 0

    run(64)  # warm-up: kernels, allocator, autograd machinery
    gc.collect()
    before = _rss()
    run(tokens)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return max(peak - before, 0)


def loss_step_peaks(model_dir: Path, tokens: int, chunk: int) -> tuple[int, int]:
    """(chunked, full) peak bytes, each measured in a fresh subprocess."""
    out = []
    for c in (chunk, 0):
        p = subprocess.run([sys.executable, __file__, "--model", str(model_dir), "--loss-tokens", str(tokens),
                            "--_loss-step", str(c)], capture_output=True, text=True, check=True)
        out.append(int(p.stdout.strip().splitlines()[-1]))
    return out[0], out[1]


# ---- (d) trainer SFT tokens/s vs a plain transformers loop ----------------------------------------------

CHATS = [
    ("Name three primary colours.", "Red, yellow and blue are the three primary colours of paint."),
    ("What does a compiler do?", "A compiler translates source code into machine code the processor runs."),
    ("Write a haiku about rain.", "Soft rain on the roof,\nthe garden drinks in silence,\nclouds drift to the east."),
    ("How many days are in a leap year?", "A leap year has 366 days: February gets a 29th day."),
    ("Give a tip for learning Python.", "Write small programs every day and read the errors carefully."),
    ("Why is the sky blue?", "Air scatters blue sunlight more than red, so the sky looks blue from the ground."),
]


def write_chat_archive(settings: Settings, model_dir: Path, rollouts: int, turns: int) -> None:
    """Conversations as archived events: each step's token_ids = its span of the model directory's chat template
    rendering (core.chat), assistant steps with (placeholder) logprobs."""
    import numpy as np

    from core.chat import ChatTokenizer
    from schemas.arrow import encode_array, to_table
    from schemas.events import (JudgeResult, JudgeResultPayload, RolloutEnded, RolloutEndedPayload, RolloutStarted,
                                RolloutStartedPayload, Step, StepPayload, TaskPayload, TaskRegistered, event_type,
                                new_event)
    from store.archive import write_flush

    chat = ChatTokenizer(model_dir)
    t0 = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)
    events = [new_event(TaskRegistered, produced_at=t0, payload=TaskPayload(task_id="chat", title="chat", split="train"))]
    for r in range(rollouts):
        rid = f"chat-{r}"
        msgs = [{"role": "system", "content": "You are a concise assistant."}]
        for k in range(turns):
            q, a = CHATS[(r * turns + k) % len(CHATS)]
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        events.append(new_event(RolloutStarted, rollout_id=rid, produced_at=t0, payload=RolloutStartedPayload(
            task_id="chat", group_id=f"g{r // 2}", timeout_s=60.0, policy_version=0, tokenizer=chat.fingerprint)))
        for i, (m, span) in enumerate(zip(msgs, chat.message_spans(msgs))):
            new = np.asarray(span, np.int32)
            events.append(new_event(Step, rollout_id=rid, produced_at=t0 + dt.timedelta(seconds=i), payload=StepPayload(
                step_idx=i, role=m["role"], content=m["content"], token_ids=encode_array(new, "int32"),
                logprobs=encode_array(np.full(len(new), -1.0, np.float32), "float32") if m["role"] == "assistant"
                else None, pinned=i == 0, policy_version=0)))
        events.append(new_event(JudgeResult, rollout_id=rid, produced_at=t0 + dt.timedelta(minutes=5),
                                payload=JudgeResultPayload(request_id=f"{rid}-j", step_idx=len(msgs) - 1,
                                                           judge_model="bench", score=r % 2 * 1.0, valid=True)))
        events.append(new_event(RolloutEnded, rollout_id=rid, produced_at=t0 + dt.timedelta(minutes=5),
                                payload=RolloutEndedPayload(status="finished", n_steps=len(msgs))))
    by_topic: dict = {}
    for ev in events:
        by_topic.setdefault(settings.topics.for_event(ev), []).append(ev)
    for topic, evs in by_topic.items():
        by_type: dict = {}
        for i, ev in enumerate(evs):
            by_type.setdefault(event_type(ev), []).append((ev, topic, 0, i))
        write_flush(settings.archive_dir, topic, "bench", 0, 0, len(evs) - 1,
                    {t: to_table(t, items)[0] for t, items in by_type.items()})


def sft_dataset(model_dir: Path, workdir: Path) -> tuple[Settings, str]:
    from consumers.materialize import build_version

    settings = Settings(home=workdir / "home", bootstrap_servers="unused:9", topics=Topics("bench"))
    write_chat_archive(settings, model_dir, rollouts=8, turns=3)
    out = build_version(settings.home, "chat-sft", "sft", {"max_tokens": 1024, "tokenizer": str(model_dir)})
    return settings, out.ref


class PlainLoop:
    """A plain transformers training loop over the trainer's micro-batches (same order, same mask)."""

    def __init__(self, settings: Settings, ref: str, model_dir: Path, budget: int, lr: float):
        import torch
        from transformers import AutoModelForCausalLM

        from trainer.data import BatchPlan, DatasetReader

        self.torch = torch
        self.it = BatchPlan(DatasetReader(settings.home, ref), budget, seed=0, shuffle=False).steps()
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
        self.records: list[dict] = []

    def step(self, _metrics: dict | None = None) -> None:
        torch = self.torch
        step = next(self.it)
        t0 = time.perf_counter()
        (mb,) = step.micro_batches
        ids = torch.from_numpy(mb.input_ids).long()
        labels = ids.masked_fill(torch.from_numpy(mb.loss_mask) == 0, -100)
        loss = self.model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.records.append({"loss": loss.item(), "tokens": float(step.totals.tokens),
                             "step_s": time.perf_counter() - t0})


def interleaved_sft(settings: Settings, ref: str, model_dir: Path, steps: int, budget: int,
                    lr: float) -> tuple[list[dict], list[dict]]:
    """`klong train`'s recipe (trainer.recipe.TrainRecipe: DeepSpeed engine, reader, objective) in this process,
    one plain-loop step after each of its steps (TrainRecipe.train's after_step, outside the recipe's timing), so
    both see the same load on a shared machine. Returns (the recipe's steps.jsonl records, the plain records)."""
    from trainer.config import load_config
    from trainer.recipe import TrainRecipe

    cfg = load_config(None, ["mode=sft", f"dataset={ref}", f"model.name={model_dir}", "lineage=false",
                             f"data.micro_batch_tokens={budget}", "data.shuffle=false", f"train.max_steps={steps}",
                             "train.epochs=100", "engine.zero_stage=1", f"optim.lr={lr:.12f}", "optim.grad_clip=1.0", "train.log_every=1000"])
    run_dir = settings.home / "runs" / "bench-sft"
    plain = PlainLoop(settings, ref, model_dir, budget, lr)
    recipe = TrainRecipe(settings, cfg, "bench-sft", run_dir, out=open(os.devnull, "w"))
    recipe.setup()
    try:
        recipe.train(after_step=plain.step)
    finally:
        recipe.cleanup()
    return [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()], plain.records


def tokens_per_s(records: list[dict]) -> float:
    """The fastest step after the warm-up one: on a shared machine the slower steps measure the neighbours."""
    return max(r["tokens"] / r["step_s"] for r in (records[1:] or records))


def sft_throughput(model_dir: Path, steps: int, budget: int = 1024, lr: float = 1e-5,
                   settings: Settings | None = None, ref: str | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="klong-bench-align-") as tmp:
        if ref is None:
            settings, ref = sft_dataset(model_dir, Path(tmp))
        ours, plain = interleaved_sft(settings, ref, model_dir, steps, budget, lr)
    return {"trainer": tokens_per_s(ours), "plain": tokens_per_s(plain), "trainer_loss": ours[0]["loss"],
            "plain_loss": plain[0]["loss"], "tokens": ours[0]["tokens"], "steps": steps}


def report_memory(model_dir: Path, tokens: int, chunk: int) -> None:
    chunked, full = loss_step_peaks(model_dir, tokens, chunk)
    say(f"(c) RL loss step peak, chunked ({chunk}/chunk), {tokens} tok", chunked / 2**20, "MiB")
    say(f"(c) RL loss step peak, full logits, {tokens} tok", full / 2**20, "MiB")
    say("(c) chunked / full peak", chunked / full, "x", "goal <= 0.25 " + ("OK" if chunked <= full / 4 else "MISSED"))


def report_throughput(model_dir: Path, steps: int, budget: int, settings=None, ref=None) -> None:
    r = sft_throughput(model_dir, steps, budget, settings=settings, ref=ref)
    say(f"(d) trainer SFT tokens/s ({budget}-token micro-batches)", r["trainer"], "tok/s")
    say("(d) plain transformers loop tokens/s, same batches", r["plain"], "tok/s")
    say("(d) first-step loss: trainer / plain", r["trainer_loss"] / r["plain_loss"], "x",
        f"{r['trainer_loss']:.4f} vs {r['plain_loss']:.4f}")
    say("(d) trainer / plain tokens/s", r["trainer"] / r["plain"], "x",
        "goal >= 0.9 " + ("OK" if r["trainer"] >= 0.9 * r["plain"] else "MISSED"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="model directory (default: KLONG_HOME/models/smollm2)")
    p.add_argument("--loss-tokens", type=int, default=8192, help="(c) tokens of the RL loss step")
    p.add_argument("--chunk", type=int, default=1024, help="(c) positions per chunk (loss.logit_chunk_tokens)")
    p.add_argument("--sft-steps", type=int, default=4, help="(d) optimizer steps of each loop (the first is warm-up)")
    p.add_argument("--sft-tokens", type=int, default=1024, help="(d) micro-batch budget (padded tokens)")
    p.add_argument("--only", choices=["ab", "c", "d"], help="run one part (ab: the recorded rollouts, bench/alignment_ab.py)")
    p.add_argument("--_loss-step", dest="loss_step", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    model = args.model or default_model()
    if not (model / "config.json").is_file():
        p.error(f"--model {model}: no transformers model there (klong model import FILE.gguf --name smollm2)")
    if args.loss_step is not None:  # the subprocess of (c)
        print(loss_step(model, args.loss_tokens, args.loss_step))
        return 0
    if args.only in (None, "ab"):
        from alignment_ab import report as report_alignment  # parts (a), (b): rollouts through vLLM

        report_alignment(model, say)
    if args.only in (None, "c"):
        report_memory(model, args.loss_tokens, args.chunk)
    if args.only in (None, "d"):
        report_throughput(model, args.sft_steps, args.sft_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
