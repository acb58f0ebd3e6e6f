"""Token-in/token-out recording on the real SmolLM2 through a real vLLM server (the `policy_server` fixture).

Invariant (a) of issue 10: for a rollout with no prune, the step tokens [0, k) concatenated are the token
prompt of policy call k as the server reports it (`prompt_token_ids`), and every sampled id is stored as
sampled with its logprob. SmolLM2 is weak at tools, so nothing here needs it to call one: the assertions are
on tokens. Plus the prune bookkeeping (context_start) and the builder's same-context flags.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from core.chat import ChatTokenizer
from consumers.materialize import build_version
from consumers.sink import Sink
from producers.agent import AgentConfig, PolicyEndpoint, run_agent
from producers.agent_context import TokenContext
from producers.agent_policy import PolicyClient, parse_hermes
from producers.agent_tools import TOOLS
from producers.outbox import Outbox
from producers.tasks import import_tasks
from store.catalog import Catalog
from store.datasets import open_version
from tests.test_tasks import make_task
from trainer.data import DatasetReader


def test_parse_hermes_reads_calls_like_vllm():
    content, calls = parse_hermes('Let me look.\n<tool_call>\n{"name": "bash", "arguments": {"cmd": "ls"}}\n</tool_call>')
    assert content == "Let me look.\n" and [(n, a) for _, n, a in calls] == [("bash", '{"cmd": "ls"}')]
    assert parse_hermes('<tool_call>{"name": "bash", "arguments": {"cmd": "l')[1] == []  # bad JSON: no call at all
    assert parse_hermes("no call")[1] == [] and parse_hermes('<tool_call>{"arguments": {}}</tool_call>')[1] == []
    unfinished = parse_hermes('<tool_call>{"name": "end_task", "arguments": {}}')  # cut at max_tokens
    assert [n for _, n, _ in unfinished[1]] == ["end_task"]


@pytest.mark.timeout(900)  # the first real-model test of a session also waits for the model import and vLLM start
def test_rollout_steps_are_the_token_prompts_vllm_was_given(make_settings, tmp_path, smollm2_dir, policy_server,
                                                            monkeypatch):
    settings = make_settings()
    import_tasks(settings, [make_task(tmp_path / "tasks", "tiny", paper="A tiny paper.\n")], "train")
    calls = []  # (prompt sent, TokenCompletion) of every policy call: the server's own view of the prompt
    real = PolicyClient.complete_tokens

    def spy(self, prompt_ids, **kw):
        out = real(self, prompt_ids, **kw)
        calls.append((list(prompt_ids), out))
        return out

    monkeypatch.setattr(PolicyClient, "complete_tokens", spy)
    config = AgentConfig(model_dir=str(smollm2_dir), mandatory_reading=False, max_turns=3, max_tokens=12,
                         temperature=1.0, seed=7, sandbox="unsafe-local", reminder_every_turns=0)
    with Outbox(settings) as outbox:
        res = run_agent(outbox, settings, "tiny", PolicyEndpoint(policy_server.base_url, policy_server.model_name),
                        timeout_s=900, group_id="g", config=config, judge=False)
    assert res.status == "timeout" and res.n_turns == 3 and res.n_prunes == 0, res
    Sink(settings).run(until_idle=True, idle_s=0.3)
    steps = Catalog(settings).arrow(
        f"SELECT s.step_idx, s.role, s.context_start, t.token_ids AS ids, t.logprobs AS lps "
        f"FROM step_events s JOIN step_tokens t USING (rollout_id, step_idx) WHERE s.rollout_id = '{res.rollout_id}' "
        "ORDER BY step_idx").to_pylist()
    assistant = [s for s in steps if s["role"] == "assistant"]
    assert len(assistant) == len(calls) == 3
    for s, (prompt, out) in zip(assistant, calls):
        before = [t for p in steps[:s["step_idx"]] for t in p["ids"]]
        assert out.prompt_token_ids == prompt  # what the server was given is what the runner sent
        ids, lps = s["ids"], np.array(s["lps"], np.float64)
        sampled = ~np.isnan(lps)
        header = int(np.argmax(sampled))
        assert before + ids[:header] == prompt  # (a): steps [0, k) ++ the generation prompt == the prompt of call k
        assert [i for i, f in zip(ids, sampled) if f] == out.token_ids  # sampled ids stored as sampled
        assert np.allclose(lps[sampled], out.logprobs, atol=1e-6) and np.all(sampled[header:header + len(out.token_ids)])
        assert s["context_start"] == 2  # no prune: the whole context after the prefix (system, task)
    chat = ChatTokenizer(smollm2_dir)
    assert Catalog(settings).arrow("SELECT tokenizer FROM rollout_started_events").column(0).to_pylist() == [chat.fingerprint]
    # the builder: one window, every span in the context it was generated in, ids from one tokenizer
    out = build_version(settings.home, "rl-sft", "sft", {"max_tokens": 4096, "tokenizer": str(smollm2_dir),
                                                         "statuses": ["timeout"]})
    assert out.manifest["counts"]["token_ids_from"] == chat.fingerprint
    samples = pq.read_table(open_version(settings.home, out.ref).path / "samples.parquet",
                            columns=["span_same_ctx", "prefix_same_ctx"]).to_pylist()
    assert len(samples) == 1 and all(samples[0]["span_same_ctx"]) and samples[0]["prefix_same_ctx"]
    ids, mask = DatasetReader(settings.home, out.ref).sample(0)
    assert ids.tolist() == [t for s in steps for t in s["ids"]][:len(ids)]


def test_prune_keeps_recorded_ids_and_moves_context_start(smollm2_dir):
    ctx = TokenContext(ChatTokenizer(smollm2_dir), TOOLS)
    ctx.observe({"role": "system", "content": "sys"}, step_idx=0, pinned=True)
    ctx.observe({"role": "user", "content": "task"}, step_idx=1, pinned=True)
    for k in range(2, 12):
        role = "assistant" if k % 2 == 0 else "tool"
        msg = {"role": role, "content": f"message {k}"}
        ids = ctx.chat.added_ids(ctx.messages, [msg], TOOLS)
        ctx._append(msg, ids, k, pinned=False)
    assert ctx.context_start(12) == 2 and ctx.n_prefix == 2
    before = {s: ids.tolist() for s, ids in zip(ctx.steps, ctx.ids)}
    assert ctx.prune(0.3)
    assert ctx.steps[:2] == [0, 1] and ctx.steps[2] > 2 and ctx.messages[2]["role"] == "assistant"
    assert ctx.context_start(12) == ctx.steps[2]
    assert all(ids.tolist() == before[s] for s, ids in zip(ctx.steps, ctx.ids))  # nothing re-tokenized
    assert ctx.prompt_ids == [t for s in ctx.steps for t in before[s]]


def test_same_context_flags_follow_context_start_across_windows():
    from consumers.materialize import same_context
    from consumers.split import SplitConfig, split_rollout

    roles = ["system", "user"] + ["assistant", "tool"] * 6 + ["assistant"]
    n_tok = np.array([5, 5] + [3, 2] * 6 + [3])
    res = split_rollout(roles, [True, True] + [False] * 13, n_tok, SplitConfig(5 + 5 + 12, 1))
    assert len(res.windows) > 2 and res.windows[0].first_step == 2
    # no prune: every step was generated after steps [0, 2) ++ [2, step): only the first window has that context
    no_prune = np.array([0, 1] + [2] * 13)
    flags = [same_context(w, no_prune, n_tok) for w in res.windows]
    assert flags[0].all() and not any(f.any() for f in flags[1:])
    # a prune before step 8 kept steps [6, ...): from step 8 on, the window starting at step 6 is the context
    pruned = np.where(np.arange(15) >= 8, 6, no_prune)
    for w in res.windows:
        f = same_context(w, pruned, n_tok)
        steps = w.spans[:, 0]
        assert f.tolist() == [bool(w.first_step == 2 and s < 8) or bool(w.first_step == 6 and s >= 8) for s in steps]
    assert not same_context(res.windows[0], np.full(15, -1), n_tok).any()  # not recorded: never flagged


def test_rollout_run_model_dir_must_exist(settings, capsys):
    from klong.cli import main

    assert main(["rollout", "run", "--task", "t", "--base-url", "http://127.0.0.1:9/v1", "--model", "m",
                 "--model-dir", "nope", "--home", str(settings.home), "--bootstrap-servers",
                 settings.bootstrap_servers, "--topic-prefix", settings.topics.prefix]) == 2
    assert "klong model import" in capsys.readouterr().err


@pytest.mark.timeout(900)
def test_tool_call_grammar_makes_every_reply_one_well_formed_call(make_settings, tmp_path, smollm2_dir,
                                                                  policy_server):
    """agent.tool_call_grammar: vLLM samples under agent_policy.tool_call_regex, so each assistant step of the
    real model is exactly one call the runner parses and executes (without it SmolLM2 seldom calls a tool)."""
    settings = make_settings()
    import_tasks(settings, [make_task(tmp_path / "tasks", "tiny", paper="Write hello.txt.\n")], "train")
    config = AgentConfig(model_dir=str(smollm2_dir), mandatory_reading=False, max_turns=2, max_tokens=96,
                         temperature=1.0, seed=3, sandbox="unsafe-local", reminder_every_turns=0,
                         min_time_fraction=1.0, tool_call_grammar=True)  # end_task refused: two turns
    with Outbox(settings) as outbox:
        res = run_agent(outbox, settings, "tiny", PolicyEndpoint(policy_server.base_url, policy_server.model_name),
                        timeout_s=900, group_id="g", config=config, judge=False)
    Sink(settings).run(until_idle=True, idle_s=0.3)
    steps = Catalog(settings).arrow(
        f"SELECT s.role, s.content, s.tool_name, t.logprobs AS lps FROM steps s JOIN step_tokens t "
        f"USING (rollout_id, step_idx) WHERE s.rollout_id = '{res.rollout_id}' ORDER BY step_idx").to_pylist()
    assistant = [s for s in steps if s["role"] == "assistant"]
    assert res.n_turns == 2 and len(assistant) == 2, (res, steps)
    names = {t["function"]["name"] for t in TOOLS}
    for s in assistant:
        # the grammar starts every reply as a call; one not cut at max_tokens is a whole call the runner ran
        assert s["content"].startswith('<tool_call>\n{"name": "'), s
        if int(np.sum(~np.isnan(np.array(s["lps"], np.float64)))) < config.max_tokens:
            assert s["tool_name"] in names, s
