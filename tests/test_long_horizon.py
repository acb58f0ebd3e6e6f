"""Long horizon: a rollout whose context overflows is pruned after the pinned prefix, and the dataset builder's
windows are the contexts the policy sampled in (`windows=context`), none over the model's length.

Pure splitting on a pruned rollout (table-driven), the runner's `context_limit` with SmolLM2's real tokenizer and
a scripted policy, and one short `klong rl run` on the real model (SmolLM2 through the session's vLLM server):
two progressive stages, a task read by chunks that overflows a 1,152-token context, rollouts carried over into
the next iteration under the next policy version and trained there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from consumers.dataset_tokens import same_context
from consumers.split import SplitConfig, split_rollout
from schemas.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

# A pruned rollout as the runner records it: system + user pinned, then (assistant, tool) pairs. The runner pruned
# before step 8 (it kept steps 6.., starting at an assistant step) and before step 14 (kept 12..).
ROLES = ["system", "user"] + ["assistant", "tool"] * 8 + ["assistant"]
N_TOK = np.array([10, 10] + [4, 6] * 8 + [4])
CTX = np.array([0, 1] + [2] * 6 + [6] * 6 + [12] * 5)  # context_start of each step (observations included)


def loss_steps(w) -> list[int]:
    return w.spans[w.spans[:, 3] == 1, 0].tolist()


def test_context_windows_are_the_contexts_sampled_and_train_only_what_was_sampled_there():
    cfg = SplitConfig(max_tokens=20 + 40, overlap_turns=1, windows="context")
    res = split_rollout(ROLES, [True, True] + [False] * 17, N_TOK, cfg, context_start=CTX)
    assert not res.context_fallback
    # one window per context: prefix ++ steps [c, last assistant step generated in c]
    assert [(w.first_step, w.last_step) for w in res.windows] == [(2, 6), (6, 12), (12, 18)]
    # loss on the assistant steps generated in the window's context only (older kept steps are context)
    assert [loss_steps(w) for w in res.windows] == [[2, 4, 6], [8, 10, 12], [14, 16, 18]]
    for w in res.windows:
        flags = same_context(w, CTX, N_TOK)
        assert flags[w.spans[:, 3] == 1].all()  # every trained span is same-context
        assert w.n_tokens == 20 + N_TOK[w.first_step:w.last_step + 1].sum() <= cfg.max_tokens
    assert res.windows[1].n_loss_tokens == 3 * 4  # steps 8, 10, 12 (the prefix trains in window 0 only)


def test_fit_windows_of_the_same_rollout_train_off_context_spans():
    """The paper's greedy windows (the default) do not follow the prunes: some trained spans get a context the
    policy never saw (why `windows=context` exists)."""
    res = split_rollout(ROLES, [True, True] + [False] * 17, N_TOK, SplitConfig(max_tokens=60, overlap_turns=1),
                        context_start=CTX)
    off = [s for w in res.windows for s, ok in zip(w.spans[:, 0].tolist(), same_context(w, CTX, N_TOK).tolist())
           if not ok and ROLES[s] == "assistant"]
    assert off


@pytest.mark.parametrize("ctx, why", [
    (np.full(19, -1), "not recorded"),
    (np.where(np.arange(19) >= 8, 1, CTX), "a context starting inside the prefix"),
    (np.where(np.arange(19) >= 8, 2, CTX), "a window over B"),
])
def test_context_windows_fall_back_to_fit_windows(ctx, why):
    cfg = SplitConfig(max_tokens=60, overlap_turns=1, windows="context")
    res = split_rollout(ROLES, [True, True] + [False] * 17, N_TOK, cfg, context_start=ctx)
    assert res.context_fallback, why
    fit = split_rollout(ROLES, [True, True] + [False] * 17, N_TOK, SplitConfig(60, 1))
    assert [(w.first_step, w.last_step) for w in res.windows] == [(w.first_step, w.last_step) for w in fit.windows]


def test_windows_key_is_checked():
    from consumers.dataset_config import DatasetConfig
    from producers.agent_config import AgentConfig

    assert DatasetConfig.from_mapping({"windows": "context"}).split_config().windows == "context"
    with pytest.raises(ConfigError, match="windows must be one of"):
        DatasetConfig.from_mapping({"windows": "turns"})
    with pytest.raises(ConfigError, match="context_limit"):
        AgentConfig(context_limit=0)


class CutPolicy:
    """Stand-in for /v1/completions that always fills max_tokens (a sample cut by its cap), recording the calls."""

    def __init__(self, token_id: int, max_tokens=None):
        self.token_id, self.max_tokens, self.calls = token_id, max_tokens, []

    def complete_tokens(self, prompt_ids, *, timeout_s, rollout_id, max_tokens=None):
        from producers.agent_policy import TokenCompletion

        self.calls.append((len(prompt_ids), max_tokens))
        n = max_tokens or 64
        return TokenCompletion([self.token_id] * n, [-0.5] * n, "", "length", list(prompt_ids))


@pytest.mark.parametrize("max_tokens", [24, None])
def test_context_limit_prunes_before_the_prompt_and_closed_turn_overflow(smollm2_dir, max_tokens):
    from core.chat import ChatTokenizer
    from producers.agent_context import TokenContext
    from producers.agent_policy import ContextLengthExceeded
    from producers.agent_tools import TOOLS

    chat = ChatTokenizer(smollm2_dir)
    ctx = TokenContext(chat, TOOLS)
    assert ctx.closing_cut() == 2  # <|im_end|>\n closes a cut turn
    policy = CutPolicy(int(chat.encode(" row")[0]), max_tokens)
    ctx.observe({"role": "system", "content": "You read files."}, step_idx=0, pinned=True)
    ctx.observe({"role": "user", "content": "Read rows.txt by chunks."}, step_idx=1, pinned=True)
    limit = ctx.limit = len(ctx) + 300  # the prefix (its tools block) and room for about two turns
    step, prunes, turns = 2, 0, []
    while len(turns) < 12:
        try:
            t = ctx.sample(policy, step_idx=step, pinned=False, timeout_s=60, rollout_id="r")
        except ContextLengthExceeded:
            assert ctx.prune(0.3)
            prunes += 1
            continue
        turns.append(t)
        assert len(t.prompt) + t.n_sampled + (len(t.token_ids) - t.n_generation_prompt - t.n_sampled) <= limit
        assert len(ctx) <= limit  # the context, the closed turn included, fits
        out = "\n".join(f"row {i} of the table" for i in range(step * 10, step * 10 + 10))
        ctx.observe({"role": "tool", "content": out}, step_idx=step + 1, pinned=False)
        step += 2
    assert prunes >= 2 and ctx.steps[:2] == [0, 1]
    if max_tokens:  # a full reply always fits: never cut by the context
        assert all(m == max_tokens and n + m + 2 <= limit for n, m in policy.calls)
    else:  # no cap: each call may sample what the context has left, less the closing ids
        assert all(m == limit - n - 2 for n, m in policy.calls)


# ---- the real model --------------------------------------------------------------------------------------------

PAPER = """# Read a long file by chunks

Create the file `rows.txt`, read it 20 lines at a time until its end, then write its last line into `answer.txt`.

<tool_call>
{"name": "bash", "arguments": {"cmd": "seq -f 'row %g of the table' 1 400 > rows.txt"}}
</tool_call>

<tool_call>
{"name": "bash", "arguments": {"cmd": "sed -n '1,20p' rows.txt"}}
</tool_call>
"""


def write_task(root: Path) -> Path:
    """A PaperBench-format task: paper, addendum, a rubric of check commands (partial credit)."""
    task = root / "read-rows"
    task.mkdir(parents=True)
    (task / "paper.md").write_text(PAPER)
    (task / "addendum.md").write_text("Only the last line matters.\n")
    (task / "blacklist.txt").write_text("")
    (task / "config.yaml").write_text('id: read-rows\ntitle: "Read a long file by chunks"\n')
    leaf = lambda i, req, w, check: {"id": i, "requirements": req, "weight": w, "sub_tasks": [],  # noqa: E731
                                     "task_category": "Code Development", "check": check,
                                     "finegrained_task_category": "Environment & Infrastructure Setup"}
    (task / "rubric.json").write_text(json.dumps({
        "id": "read-rows-root", "requirements": "rows.txt was read and its last line written down.", "weight": 1,
        "sub_tasks": [leaf("rows", "rows.txt exists.", 1, "test -f rows.txt"),
                      leaf("answer", "answer.txt exists.", 1, "test -f answer.txt"),
                      leaf("last", "answer.txt holds the last line.", 2, "grep -q 'row 400 of' answer.txt")],
        "task_category": None, "finegrained_task_category": None}))
    return task


LIMIT = 1152  # the policy's context (the SmolLM2 inline prefix with its tools block is ~940 tokens)


def long_plan(model_dir: Path, serve_home: Path) -> dict:
    """Two stages (timeouts 10m < 20m); stage 1 closes when its first rollout ends, so the others carry over."""
    return {
        "name": "long",
        "tasks": ["read-rows"],
        "serve": {"model": str(model_dir), "home": str(serve_home), "max_model_len": 4096},
        "judge": "checks",
        "stages": [{"timeout": "10m", "rollouts_per_sample": 3, "iterations": 1},
                   {"timeout": "20m", "rollouts_per_sample": 2, "iterations": 1}],
        "close_fraction": 0.3,  # 1 of 3 ended closes stage 1's iteration
        "max_concurrent_rollouts": 2,
        "dataset": {"name": "long-rl", "config": {"max_tokens": LIMIT, "windows": "context",
                                                  "tokenizer": str(model_dir)}},
        # end_task refused for the whole timeout: every rollout takes max_turns turns, and overflows
        "agent": {"min_time_fraction": 1.0, "reminder_every_turns": 0, "max_tokens": 64, "max_turns": 6,
                  "temperature": 0.7, "tool_call_grammar": True, "prompt": "inline", "context_limit": LIMIT},
        "judge_timeout": "180s",
        # one window per step (micro batch = the context limit): the run's windows are checked, not its gradients
        "train": {"config": "rl_smollm2", "timeout": "15m",
                  "overrides": {"train.max_steps": 1, "loss.tis_cap": None, "engine.cpu_threads": 2,
                                "data.micro_batch_tokens": LIMIT}},
    }


@pytest.mark.timeout(2400)  # rollouts of 6 turns and two trainings of the real model on a shared 2-core machine
def test_long_horizon_overflow_run_on_the_real_model(policy_server, smollm2_dir, make_settings, tmp_path):
    from services import serve
    from producers.tasks import import_tasks
    from store import datasets as ds
    from store.catalog import Catalog

    settings = make_settings("long")
    import_tasks(settings, [write_task(tmp_path / "tasks")], "train")
    serve_home = policy_server.state_file.parent
    plan = tmp_path / "long.yaml"
    plan.write_text(yaml.safe_dump(long_plan(Path(smollm2_dir), serve_home)))
    try:
        proc = subprocess.run([sys.executable, "-m", "klong", "rl", "run", str(plan), "--home", str(settings.home),
                               "--bootstrap-servers", settings.bootstrap(), "--topic-prefix", settings.topics.prefix],
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True, capture_output=True, timeout=2100)
        assert proc.returncode == 0, proc.stderr
        cat = Catalog(settings)
        q = lambda sql: cat.arrow(sql).to_pylist()  # noqa: E731

        # the runner: many turns, contexts pruned after the pinned prefix, every context within the limit
        steps = q("SELECT rollout_id, step_idx, role, (octet_length(token_ids) // 4)::BIGINT AS n_tokens, pinned, "
                  "context_start, policy_version FROM step_events ORDER BY rollout_id, step_idx")
        by_r: dict = {}
        for s in steps:
            by_r.setdefault(s["rollout_id"], []).append(s)
        turns = prunes = 0
        for rid, st in by_r.items():
            n = np.array([s["n_tokens"] for s in st])
            p = 1 + max(i for i, s in enumerate(st) if s["pinned"])
            acts = [s for s in st if s["role"] == "assistant"]
            turns += len(acts)
            starts = [s["context_start"] for s in acts]
            prunes += len(set(starts)) - 1
            for s in acts:  # prefix ++ [c, s] (the closed turn) fits the model's length
                assert p <= s["context_start"] and n[:p].sum() + n[s["context_start"]:s["step_idx"] + 1].sum() <= LIMIT
        assert prunes >= len(by_r), f"{prunes} prunes in {len(by_r)} rollouts: the contexts did not overflow"

        # the builder: windows = the contexts sampled, every trained span same-context, none over the length
        samples = [{**row, "version": v} for v in ds.versions(settings.home, "long-rl") for row in pq.read_table(
            ds.version_dir(settings.home, "long-rl", v) / ds.SAMPLES).to_pylist()]  # the span lists: not in the view
        assert len(samples) > len({s["rollout_id"] for s in samples}), "no rollout split into several windows"
        ctx_of = {(s["rollout_id"], s["step_idx"]): s["context_start"] for s in steps}
        trained = same = 0
        for w in samples:
            assert w["n_tokens"] <= LIMIT and w["prefix_same_ctx"]
            for step, loss, ok in zip(w["span_step"], w["span_loss"], w["span_same_ctx"]):
                if loss:
                    trained += 1
                    same += ok
                    assert ctx_of[(w["rollout_id"], step)] == w["first_step"]  # generated in this very window
        assert trained and same == trained
        manifests = q("SELECT version FROM datasets WHERE dataset = 'long-rl'")
        assert len(manifests) == 2

        # carry-over: started in iteration 1, ended in iteration 2; steps sampled after the carry-over are v1's (the
        # late-started one acts under v1 only; one carried near its last turn may have none); trained in iteration 2
        its = q("SELECT iteration, stage, policy_version, phase, dataset, carried_out FROM rl_iterations "
                "ORDER BY iteration")
        assert [(r["iteration"], r["stage"], r["policy_version"], r["phase"]) for r in its] == \
            [(1, 1, 0, "trained"), (2, 2, 1, "trained")]
        carried = q("SELECT rollout_id FROM rl_rollouts WHERE carried AND first_iteration = 1 AND last_iteration = 2")
        assert carried, its
        ids = {r["rollout_id"] for r in carried}
        pvs = {rid: sorted({s["policy_version"] for s in by_r[rid] if s["role"] == "assistant"}) for rid in ids}
        assert all(set(v) <= {0, 1} for v in pvs.values()) and any(1 in v for v in pvs.values()), pvs
        second = [w for w in samples if w["version"] == 2]
        assert ids <= {w["rollout_id"] for w in second}  # built into iteration 2's dataset, trained by its run
        assert not ids & {w["rollout_id"] for w in samples if w["version"] == 1}
        print(json.dumps({"rollouts": len(by_r), "turns": turns, "prunes": prunes, "windows": len(samples),
                          "trained_spans": trained, "same_context": same / trained,
                          "max_window_tokens": max(w["n_tokens"] for w in samples), "limit": LIMIT,
                          "carried": {rid: pvs[rid] for rid in ids},
                          "carried_windows_in_v2": sum(w["rollout_id"] in ids for w in second),
                          "windows_policy_version_v2": sorted({w["policy_version"] for w in second})}))
    finally:  # the session's server serves the base model again for the next test
        server = serve.PolicyServer.from_home(serve_home)
        server.reload(server.state.model, 0, allow_restart=False)
        policy_server.state = server.state
