"""Benchmark: how fast the trainer's reader (trainer.data) delivers batches from a dataset version (issue 4).

    .venv/bin/python bench/loader.py [--rollouts 48 --turns 300] [--max-tokens 16384] [--budget 32768]

Builds an RL dataset version from a simulated archive (`bench/materialize.py`'s generator: ~10k-token pinned
prefix, lognormal observations, actions with logprobs; the real builder `consumers.materialize`), then
produces one epoch of micro-batches (seeded shuffle, packing by the token budget) three ways, measured in
the same run over the same batches:

- reader:   trainer.data.DatasetReader + BatchPlan (the dataset read into flat arrays once at open)
- copy:     np.copyto of exactly the bytes the reader outputs (ids int32, mask uint8, advantage and
            logprobs float32, padding included) from ready-made arrays: the memory-bandwidth limit
- datasets: Hugging Face `datasets` loading the same two Parquet files (Dataset.from_parquet, numpy
            format), assembling each sample from its rollout row as the layout documents (prefix ++
            spans, mask, per-token advantage, behaviour logprobs) and padding, as a user would write it;
            its batches are checked equal to the reader's

Also a tiny-model training step (forward, backward, AdamW; 1 CPU thread, as the shipped YAMLs run) on a
micro-batch of the same budget, to put the reader's time per step beside it. One figure per line; goals:
reader >= 1.0x datasets, >= 0.25x copy, reader < 5% of a step. (`datasets` is not a dependency of klong:
`pip install datasets` to run this.)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.materialize import make_archive  # noqa: E402
from core.settings import Settings, Topics  # noqa: E402


def say(name: str, value: float, unit: str, note: str = "") -> None:
    print(f"{name:<44} {value:>14,.{4 if abs(value) < 1 else 2}f} {unit:<10} {note}", flush=True)


def reader_seconds(plan) -> tuple[float, int]:
    """One epoch as the trainer consumes it: each micro-batch built, used, dropped."""
    t0 = time.perf_counter()
    tokens = 0
    for step in plan.steps(epochs=1):
        for mb in step.micro_batches:
            tokens += mb.n_tokens
    return time.perf_counter() - t0, tokens


def copy_seconds(batches: list, repeats: int = 3) -> float:
    """The same output bytes (ids int32, mask uint8, advantage + logprobs float32, padding included) copied
    from ready-made arrays into fresh ones per micro-batch, dropped like the reader's: the memcpy limit."""
    fields = ("input_ids", "loss_mask", "advantage", "logprobs")
    src = [[getattr(mb, f) for f in fields] for mb in batches]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for arrays in src:
            for a in arrays:
                np.copyto(np.empty_like(a), a)
        best = min(best, time.perf_counter() - t0)
    return best


def datasets_epoch(path: Path, batches: list, max_tokens: int, vocab: int) -> tuple[float, float]:
    """HF datasets: same Parquet, same batches. Returns (load seconds, batch seconds)."""
    import datasets

    datasets.disable_progress_bars()
    t0 = time.perf_counter()
    tok = datasets.Dataset.from_parquet(str(path / "tokens.parquet")).with_format("numpy")
    smp = datasets.Dataset.from_parquet(str(path / "samples.parquet")).with_format("numpy")
    row_of = {rid: i for i, rid in enumerate(tok["rollout_id"])}
    t_load = time.perf_counter() - t0

    def sample(j: int):
        s = smp[j]
        r = tok[row_of[s["rollout_id"]]]
        off, asst, ids, lps = r["step_offsets"], r["step_assistant"], r["token_ids"], r["logprobs"]
        p = int(r["prefix_len"])
        steps = np.concatenate([np.arange(p), s["span_step"]])
        lo = np.concatenate([np.zeros(p, np.int64), s["span_start"]])
        hi = np.concatenate([off[1:p + 1] - off[:p], s["span_end"]])
        loss = np.concatenate([asst[:p] & bool(s["prefix_loss"]), s["span_loss"]])
        idx = np.concatenate([np.arange(off[st] + a, off[st] + b) for st, a, b in zip(steps, lo, hi)])
        mask = np.repeat(loss, hi - lo).astype(np.uint8)
        lp = lps[idx].astype(np.float32)
        return ids[idx] % vocab, mask, lp, np.float32(s["advantage"])

    t0 = time.perf_counter()
    for k, mb in enumerate(batches):  # builds each batch from `datasets` rows (mb only gives the grouping)
        rows = [sample(int(j)) for j in mb.samples]
        width = max(len(r[0]) for r in rows)
        ids = np.zeros((len(rows), width), np.int32)
        mask = np.zeros((len(rows), width), np.uint8)
        lp = np.zeros((len(rows), width), np.float32)
        for i, (a, m, l, _) in enumerate(rows):
            ids[i, :len(a)], mask[i, :len(m)], lp[i, :len(l)] = a, m, l
        mask[:, 0] = 0
        nan = np.isnan(lp)
        mask[nan], lp[nan] = 0, 0
        adv = mask * np.array([r[3] for r in rows], np.float32)[:, None]
        if k < 3:  # the same batches as the reader's
            assert np.array_equal(ids, mb.input_ids) and np.array_equal(mask, mb.loss_mask)
            assert np.array_equal(lp * mask, mb.logprobs * mask) and np.allclose(adv, mb.advantage)
    return t_load, time.perf_counter() - t0


def tiny_step_seconds(mb, max_tokens: int, repeats: int = 2) -> float:
    import torch

    from trainer.config import ModelConfig
    from trainer.losses import Norm, sft_loss, token_logprobs
    from trainer.model import load_model

    torch.set_num_threads(1)
    model, _ = load_model(ModelConfig(), max_tokens)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.from_numpy(mb.input_ids).long()
    mask = torch.from_numpy(mb.loss_mask[:, 1:]).float()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss, _ = sft_loss(token_logprobs(model(input_ids=ids).logits, ids), mask, Norm("token", int(mask.sum()), 1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rollouts", type=int, default=24)
    ap.add_argument("--turns", type=int, default=300)
    ap.add_argument("--max-tokens", type=int, default=16384, help="the dataset's L_max")
    ap.add_argument("--budget", type=int, default=32768, help="micro_batch_tokens")
    ap.add_argument("--vocab", type=int, default=512, help="tiny model vocabulary (ids are folded into it)")
    args = ap.parse_args()

    from consumers.materialize import build_version
    from trainer.data import BatchPlan, DatasetReader

    with tempfile.TemporaryDirectory(prefix="klong-bench-loader-") as tmp:
        home = Path(tmp)
        make_archive(Settings(home=home, bootstrap_servers="unused:9", topics=Topics("bench")), args.rollouts,
                     args.turns)
        t0 = time.perf_counter()
        built = build_version(home, "bench", "rl", {"max_tokens": args.max_tokens, "overlap_turns": 2})
        c = built.manifest["counts"]
        print(f"dataset {built.ref}: {c['samples']} samples, {c['tokens']:,} unique tokens stored, "
              f"L_max {args.max_tokens}, built in {time.perf_counter() - t0:.1f}s; budget {args.budget} tokens")

        t0 = time.perf_counter()
        DatasetReader(home, built.ref, verify=True, vocab_size=args.vocab, fold_token_ids=True)
        say("reader open + content-hash check (once)", time.perf_counter() - t0, "s")
        t0 = time.perf_counter()
        reader = DatasetReader(home, built.ref, verify=False, vocab_size=args.vocab, fold_token_ids=True)
        say("reader open without the check (once)", time.perf_counter() - t0, "s")
        plan = BatchPlan(reader, args.budget, seed=0)
        batches = [mb for step in plan.steps(epochs=1) for mb in step.micro_batches]  # for copy / datasets
        t_reader, tokens = min(reader_seconds(plan) for _ in range(3))
        t_copy = copy_seconds(batches)
        t_load, t_ds = datasets_epoch(reader.path, batches, args.max_tokens, args.vocab)
        padded = sum(mb.input_ids.size for mb in batches)
        print(f"one epoch: {len(batches)} micro-batches, {tokens:,} tokens ({padded:,} with padding)")
        say("reader", tokens / t_reader / 1e6, "Mtok/s")
        say("copy limit (same output bytes)", tokens / t_copy / 1e6, "Mtok/s")
        say("HF datasets (same Parquet, same batches)", tokens / t_ds / 1e6, "Mtok/s", f"(+{t_load:.1f}s load)")
        say("reader / copy", t_copy / t_reader, "x", "(goal >= 0.25)")
        say("reader / datasets", t_ds / t_reader, "x", "(goal >= 1.0)")
        mb = max(batches, key=lambda b: b.input_ids.size)
        step = tiny_step_seconds(mb, args.max_tokens)
        per_step = t_reader / len(batches)
        say("tiny-model step (fwd+bwd+AdamW, 1 thread)", step, "s", f"({mb.input_ids.shape[0]} x {mb.input_ids.shape[1]})")
        say("reader time per micro-batch", per_step * 1e3, "ms")
        say("reader share of a step", 100 * per_step / (per_step + step), "%", "(goal < 5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
