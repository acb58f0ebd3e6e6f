"""bench/alignment.py parts (a) and (b): rollouts recorded through the runner, token-in/token-out, with the
real SmolLM2 served by a real vLLM (float32, CPU), built into an RL dataset; then, over its windows:

(a) share of sampled tokens whose training context equals their generation context where it must: the
    builder flags a token (samples.span_same_ctx) when the window gives its step the context it was
    generated in; the truth is the server's own `prompt_token_ids` of that policy call (captured beside the
    runner) compared with the window's input up to the token. Printed: flagged tokens that are truly equal
    (precision) and truly equal tokens that are flagged (recall); goal 100% each. The server's context is
    kept small (max_model_len 2048, about 1.5k of it the prompt) so rollouts prune and later windows start
    mid-rollout: tokens there are not in their generation context, and must not be flagged.
(b) mean |logp_trainer - logp_vllm| on the flagged tokens: a float32 transformers forward of each window's
    input (the trainer's model class and dtype) against the behaviour logprobs vLLM returned. Goal <= 1e-3.
"""

from __future__ import annotations

import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np


def record(model_dir: Path, work: Path, rollouts: int, turns: int, max_tokens: int, max_model_len: int):
    """Starts a broker and a vLLM server, records `rollouts` concurrent rollouts (token-in/token-out),
    judges them with synthetic scores, archives everything; returns (settings, {rollout_id: [calls]})."""
    from consumers.sink import Sink
    from services import serve
    from services.broker import BrokerProcess, ensure_topics, free_port
    from core.settings import Settings, Topics
    from producers.agent import AgentConfig, PolicyEndpoint, run_agent
    from producers.agent_policy import PolicyClient
    from producers.outbox import Outbox
    from producers.recorder import publish
    from producers.tasks import import_tasks
    from schemas.events import JudgeResult, JudgeResultPayload, new_event
    from tests.test_tasks import make_task

    broker = BrokerProcess.start(free_port(), work / "broker.log")
    server = None
    try:
        settings = Settings(home=work / "home", bootstrap_servers=broker.bootstrap, topics=Topics("bench"))
        settings.home.mkdir(parents=True)
        ensure_topics(settings)
        import_tasks(settings, [make_task(work / "tasks", "tiny", paper="A tiny paper.\n")], "train")
        t0 = time.monotonic()
        server = serve.start(Settings(home=work / "serve"), serve.ServeConfig(model=str(model_dir),
                                                                             max_model_len=max_model_len))
        print(f"# vLLM ready after {time.monotonic() - t0:.0f} s", flush=True)
        calls: dict[str, list] = {}
        lock = threading.Lock()
        real = PolicyClient.complete_tokens

        def spy(self, prompt_ids, *, timeout_s, rollout_id):  # the server's view of each successful call
            out = real(self, prompt_ids, timeout_s=timeout_s, rollout_id=rollout_id)
            with lock:
                calls.setdefault(rollout_id, []).append(out)
            return out

        PolicyClient.complete_tokens = spy
        config = AgentConfig(model_dir=str(model_dir), mandatory_reading=False, max_turns=turns, max_tokens=max_tokens,
                             seed=None, sandbox="unsafe-local", reminder_every_turns=0)
        results = []
        t0 = time.monotonic()
        with Outbox(settings) as box:
            def one(k: int) -> None:
                results.append(run_agent(box, settings, "tiny", PolicyEndpoint(server.base_url, server.model_name),
                                         timeout_s=3600, group_id="g", config=config, judge=False))

            threads = [threading.Thread(target=one, args=(k,)) for k in range(rollouts)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for k, r in enumerate(results):  # Q per rollout: the advantages need a spread, not a judge
                publish(box, new_event(JudgeResult, rollout_id=r.rollout_id, payload=JudgeResultPayload(
                    request_id=str(uuid.uuid4()), step_idx=r.n_steps - 1, task_id="tiny", judge_model="bench",
                    score=k / max(1, rollouts - 1), valid=True)))
        PolicyClient.complete_tokens = real
        print(f"# {rollouts} rollouts x {turns} turns in {time.monotonic() - t0:.0f} s, "
              f"{sum(r.n_prunes for r in results)} prunes, statuses {[r.status for r in results]}", flush=True)
        for r in results:
            if r.error:
                print(f"# rollout {r.rollout_id}: {r.error}", flush=True)
        Sink(settings).run(until_idle=True, idle_s=0.5)
        return settings, calls
    finally:
        if server is not None:
            server.stop()
        broker.stop()


def windows(settings, ref: str):
    """Per sample: (rollout_id, ids, behaviour logprobs (NaN: not sampled), flags, step of each token)."""
    import pyarrow.parquet as pq

    from store.catalog import Catalog
    from store.datasets import open_version
    from trainer.data import DatasetReader

    reader = DatasetReader(settings.home, ref)
    samples = pq.read_table(open_version(settings.home, ref).path / "samples.parquet").to_pylist()
    rows = Catalog(settings).arrow("SELECT rollout_id, step_idx, token_ids, logprobs FROM step_tokens").to_pylist()
    steps = {(r["rollout_id"], r["step_idx"]): r for r in rows}
    t = pq.read_table(open_version(settings.home, ref).path / "tokens.parquet", columns=["rollout_id", "prefix_len"])
    prefix = dict(zip(t.column("rollout_id").to_pylist(), t.column("prefix_len").to_pylist()))
    out = []
    for j, s in enumerate(samples):
        rid = s["rollout_id"]
        spans = [(k, 0, len(steps[(rid, k)]["token_ids"]), s["prefix_same_ctx"]) for k in range(prefix[rid])]
        spans += list(zip(s["span_step"], s["span_start"], s["span_end"], s["span_same_ctx"]))
        ids, lps, flag, step = [], [], [], []
        for k, a, b, same in spans:
            st = steps[(rid, k)]
            ids += st["token_ids"][a:b]
            lps += (st["logprobs"] or [float("nan")] * len(st["token_ids"]))[a:b]
            flag += [same] * (b - a)
            step += [k] * (b - a)
        assert ids == reader.sample(j)[0].tolist(), "the reader's window differs from its spans"
        out.append((rid, np.array(ids), np.array(lps, np.float64), np.array(flag), np.array(step)))
    return out


def measure(model_dir: Path, settings, ref: str, calls: dict) -> dict:
    """(a) precision/recall of the builder's same-context flags against the server's prompts; (b) mismatch."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    flagged = truly = both = 0
    diffs = []
    for rid, ids, lps, flag, step in windows(settings, ref):
        sampled = ~np.isnan(lps)
        # the n-th assistant step of a rollout is its n-th successful policy call
        asst = sorted({int(k) for k in step[sampled]})
        order = {k: n for n, k in enumerate(_assistant_steps(settings, rid))}
        equal = np.zeros(len(ids), bool)
        for k in asst:
            pos = np.flatnonzero((step == k) & sampled)
            prompt = calls[rid][order[k]].prompt_token_ids
            equal[pos] = ids[:pos[0]].tolist() == prompt  # the sampled ids after it are the same ids either way
        flagged += int((flag & sampled).sum())
        truly += int((equal & sampled).sum())
        both += int((flag & equal & sampled).sum())
        use = flag & sampled
        if use.any():
            with torch.no_grad():
                logits = model(torch.as_tensor(ids[None], dtype=torch.long)).logits[0].float()
            lp = torch.log_softmax(logits[:-1], -1).gather(1, torch.as_tensor(ids[1:, None], dtype=torch.long))[:, 0]
            pos = np.flatnonzero(use)
            pos = pos[pos > 0]
            diffs.append(np.abs(lp.numpy()[pos - 1] - lps[pos]))
    d = np.concatenate(diffs) if diffs else np.zeros(0)
    return {"flagged": flagged, "truly": truly, "both": both, "mismatch": float(d.mean()) if len(d) else float("nan"),
            "mismatch_max": float(d.max()) if len(d) else float("nan"), "n": len(d)}


_ASSISTANT: dict = {}


def _assistant_steps(settings, rid: str) -> list[int]:
    from store.catalog import Catalog

    if not _ASSISTANT:
        for r in Catalog(settings).arrow("SELECT rollout_id, step_idx FROM steps WHERE role = 'assistant' "
                                         "ORDER BY rollout_id, step_idx").to_pylist():
            _ASSISTANT.setdefault(r["rollout_id"], []).append(r["step_idx"])
    return _ASSISTANT[rid]


def report(model_dir: Path, say, rollouts: int = 3, turns: int = 8, max_tokens: int = 32,
           max_model_len: int = 2048) -> None:
    from consumers.materialize import build_version

    with tempfile.TemporaryDirectory(prefix="klong-bench-align-") as tmp:
        settings, calls = record(model_dir, Path(tmp), rollouts, turns, max_tokens, max_model_len)
        out = build_version(settings.home, "align-rl", "rl", {"max_tokens": max_model_len, "overlap_turns": 1,
                                                              "tokenizer": str(model_dir), "statuses": ["timeout"]})
        c = out.manifest["counts"]
        print(f"# {out.ref}: {c['samples']} windows, {c['tokens']} tokens, {c['loss_tokens']} loss tokens", flush=True)
        r = measure(model_dir, settings, out.ref, calls)
    say("(a) flagged same-context tokens truly equal (precision)", 100.0 * r["both"] / max(1, r["flagged"]), "%",
        f"{r['both']}/{r['flagged']} goal 100% " + ("OK" if r["both"] == r["flagged"] > 0 else "MISSED"))
    say("(a) truly same-context tokens flagged (recall)", 100.0 * r["both"] / max(1, r["truly"]), "%",
        f"{r['both']}/{r['truly']} goal 100% " + ("OK" if r["both"] == r["truly"] > 0 else "MISSED"))
    say("(b) mean |logp_trainer - logp_vllm| on them, float32", r["mismatch"], "nats",
        f"= {r['mismatch']:.2e}, max {r['mismatch_max']:.2e} over {r['n']} tokens, goal <= 1e-3 "
        + ("OK" if r["mismatch"] <= 1e-3 else "MISSED"))
