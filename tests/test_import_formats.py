"""`klong import trajectories` of other harnesses' files: Harbor's ATIF (token ids kept exactly) and
mini-SWE-agent's .traj.json. Fixtures follow the real specs (ATIF RFC v1.4: steps with source/message/
tool_calls/observation/metrics; mini-SWE-agent `save_traj`: info + messages + trajectory_format). The import
runs for real: CLI, broker, sink, DuckDB views."""

from __future__ import annotations

import json
import math

import numpy as np

from producers.import_formats import atif_row, detect, mini_swe_row, read_objects
from store.catalog import Catalog
from tests.helpers import produce
from tests.test_import import SYSTEM, TASK, cli, sink, task_event

# Token ids as a chat template would render them (ids are arbitrary but consistent): <s>=1, </s>=2.
SYS_IDS, TASK_IDS, HEADER = [1, 10, 11, 2], [1, 20, 21, 22, 2], [1, 30]
C1, C2, C3 = [40, 41, 42, 2], [43, 44, 2], [45, 46, 47, 48, 2]
OBS1, OBS2 = [1, 50, 51, 2], [1, 52, 2]


def atif_doc(session="sess-1", **extra) -> dict:
    """Three agent steps: read the paper (read_file_chunk), run bash, answer; prompts grow token by token."""
    p1 = SYS_IDS + TASK_IDS + HEADER
    p2 = p1 + C1 + OBS1 + HEADER
    p3 = p2 + C2 + OBS2 + HEADER
    lp = lambda n, k: [-0.1 * (k + 1) - 0.01 * i for i in range(n)]  # noqa: E731
    return {
        "schema_version": "ATIF-v1.4", "session_id": session,
        "agent": {"name": "harbor-agent", "version": "1.0.0", "model_name": "SmolLM2-135M-Instruct"},
        "steps": [
            {"step_id": 1, "timestamp": "2025-10-11T10:30:00Z", "source": "system", "message": SYSTEM},
            {"step_id": 2, "source": "user", "message": TASK},
            {"step_id": 3, "source": "agent", "model_name": "SmolLM2-135M-Instruct", "message": "Reading the paper.",
             "reasoning_content": "The paper comes first.",
             "tool_calls": [{"tool_call_id": "call_1", "function_name": "read_file_chunk",
                             "arguments": {"file": "/home/paper/paper.md", "start_line": 1, "max_lines": 50}}],
             "observation": {"results": [{"source_call_id": "call_1", "content": "# FRE\nWe propose ..."}]},
             "metrics": {"prompt_tokens": len(p1), "completion_tokens": len(C1), "prompt_token_ids": p1,
                         "completion_token_ids": C1, "logprobs": lp(len(C1), 0)}},
            {"step_id": 4, "source": "agent", "message": "",
             "tool_calls": [{"tool_call_id": "call_2", "function_name": "bash", "arguments": {"cmd": "ls /home"}}],
             "observation": {"results": [{"source_call_id": "call_2", "content": "paper submission"}]},
             "metrics": {"prompt_token_ids": p2, "completion_token_ids": C2, "logprobs": lp(len(C2), 1)}},
            {"step_id": 5, "source": "agent", "message": "Done: the reproduction is in /home/submission.",
             "metrics": {"prompt_token_ids": p3, "completion_token_ids": C3, "logprobs": lp(len(C3), 2),
                         "cost_usd": 0.0003, "extra": {"reasoning_tokens": 0}}},
        ],
        "final_metrics": {"total_prompt_tokens": len(p1) + len(p2) + len(p3), "total_steps": 5},
        **extra,
    }


def mini_swe_doc(v11: bool = False) -> dict:
    """What mini-SWE-agent's save_traj writes: info (exit status, model config), messages, trajectory_format."""
    x = (lambda **k: {"extra": k}) if v11 else (lambda **k: {})  # noqa: E731
    msgs = [
        {"role": "system", "content": "You are a helpful assistant that can interact with a computer."},
        {"role": "user", "content": "Please solve this issue: reproduce the paper in /home/paper."},
        {"role": "assistant", "content": "THOUGHT: Read the paper first.\n\n```bash\nhead -50 /home/paper/paper.md\n```",
         **x(actions=[{"command": "head -50 /home/paper/paper.md"}])},
        {"role": "user", "content": "<returncode>0</returncode>\n<output>\n# FRE\n</output>", **x(returncode=0)},
        {"role": "assistant", "content": "THOUGHT: Done.\n\n```bash\necho COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT\n```"},
        {"role": "user", "content": ""},
    ]
    if v11:
        msgs.append({"role": "exit", "content": "", "extra": {"exit_status": "Submitted", "submission": ""}})
    return {"info": {"exit_status": "Submitted", "submission": "", "mini_version": "2.0.0" if v11 else "1.9.0",
                     "model_stats": {"instance_cost": 0.01, "api_calls": 2},
                     "config": {"model": {"model_name": "anthropic/claude-sonnet-4-5"}, "agent": {"step_limit": 0}}},
            "messages": msgs, "trajectory_format": "mini-swe-agent-1.1" if v11 else "mini-swe-agent-1"}


# ---- conversion (pure) --------------------------------------------------------------------------------


def test_atif_conversion_keeps_token_ids_exactly():
    row = atif_row(atif_doc(), "fre")
    roles = [m["role"] for m in row["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "assistant", "tool", "assistant"]
    ids = [m.get("token_ids") for m in row["messages"]]
    assert ids == [[], SYS_IDS + TASK_IDS + HEADER, C1, OBS1 + HEADER, C2, OBS2 + HEADER, C3]
    whole = atif_doc()["steps"][4]["metrics"]["prompt_token_ids"] + C3
    assert sum(ids, []) == whole  # the steps concatenated: exactly what the model was given, and wrote
    assert row["messages"][2]["tool_calls"][0]["function"] == {
        "name": "read_file_chunk", "arguments": json.dumps({"file": "/home/paper/paper.md", "start_line": 1,
                                                            "max_lines": 50})}
    assert row["messages"][3]["tool_call_id"] == "call_1" and row["id"].startswith("sess-1@")
    assert len(row["messages"][6]["logprobs"]) == len(C3) and row["model"] == "SmolLM2-135M-Instruct"
    # which ids were sampled: each completion whole (its header is in the prompt before it)
    assert [(m.get("n_generation_prompt"), m.get("n_sampled")) for m in row["messages"] if m["role"] == "assistant"] \
        == [(0, len(C1)), (0, len(C2)), (0, len(C3))]


def test_atif_pruned_prompts_consecutive_agents_and_errors():
    doc = atif_doc()
    doc["steps"][3]["metrics"]["prompt_token_ids"] = [1, 99] + HEADER  # the harness pruned its context
    doc["steps"][4]["metrics"]["prompt_token_ids"] = [1, 99] + HEADER + C2 + OBS2 + HEADER
    row = atif_row(doc, "fre")
    assert "token_ids" not in row["messages"][3] and row["messages"][4]["token_ids"] == C2  # obs stays text-only
    assert row["messages"][5]["token_ids"] == OBS2 + HEADER  # in sync again from the pruned prompt on
    doc = atif_doc()
    del doc["steps"][3]["observation"]  # agent after agent: the markup in between follows the first completion
    doc["steps"][3]["metrics"]["prompt_token_ids"] = SYS_IDS + TASK_IDS + HEADER + C1 + OBS1 + HEADER
    doc["steps"][4]["metrics"]["prompt_token_ids"] = doc["steps"][3]["metrics"]["prompt_token_ids"] + C2 + HEADER
    m = atif_row(doc, "fre")["messages"]
    assert m[4]["token_ids"] == C2 + HEADER and all(math.isnan(x) for x in m[4]["logprobs"][-2:])
    assert (m[4]["n_generation_prompt"], m[4]["n_sampled"]) == (0, len(C2))  # the markup after it: not sampled
    bad = atif_doc()
    bad["steps"][4]["metrics"]["logprobs"] = [-0.1]
    assert "logprobs" in next(read_objects_of(bad))[2]
    bad = atif_doc()
    bad["steps"][1]["source"] = "environment"
    assert "source must be system, user or agent" in next(read_objects_of(bad))[2]
    assert "--task-id" in next(read_objects_of(atif_doc(), task_id=None))[2]
    assert atif_row(atif_doc(extra={"task_id": "lca"}))["task_id"] == "lca"


def read_objects_of(doc, task_id="fre", tmp=[None]):  # noqa: B006
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(doc, f, indent=2)
    return read_objects(f.name, "auto", task_id)


def test_mini_swe_conversion_and_detection():
    for v11 in (False, True):
        doc = mini_swe_doc(v11)
        assert detect(doc) == "mini-swe"
        row = mini_swe_row(doc, "fre")
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant", "user", "assistant", "user"]
        assert all(set(m) <= {"role", "content"} for m in row["messages"]) and row["model"].endswith("sonnet-4-5")
    assert detect(mini_swe_doc()["messages"]) == "mini-swe"  # the bare list of older versions
    assert detect(atif_doc()) == "atif" and detect({"task_id": "x", "messages": []}) == "openai"
    assert detect(mini_swe_doc()["messages"], whole_file=False) == "openai"  # a JSONL line: a (bad) chat row


# ---- the import, for real --------------------------------------------------------------------------------


def test_import_atif_and_mini_swe_files(settings, tmp_path, capsys):
    produce(settings, [task_event("fre")])
    atif = tmp_path / "trajectory.json"
    atif.write_text(json.dumps(atif_doc(), indent=2))
    swe = tmp_path / "fre.traj.json"
    swe.write_text(json.dumps(mini_swe_doc(v11=True), indent=2))
    jsonl = tmp_path / "many.jsonl"  # one ATIF trajectory per line, the second broken
    broken = atif_doc(session="sess-2")
    broken["steps"][2]["tool_calls"][0].pop("function_name")
    jsonl.write_text(json.dumps(atif_doc(session="sess-3")) + "\n" + json.dumps(broken) + "\n")

    assert cli(settings, "import", "trajectories", str(atif), "--task-id", "fre") == 0
    assert cli(settings, "import", "trajectories", str(swe), "--format", "mini-swe", "--task-id", "fre") == 0
    assert cli(settings, "import", "trajectories", str(jsonl), "--format", "atif", "--task-id", "fre") == 1
    out = capsys.readouterr().out
    assert "line 2: ATIF steps[2].tool_calls[0]: function_name (a string) is required" in out
    sink(settings)
    cat = Catalog(settings)
    rollouts = cat.sql("SELECT rollout_id, model, n_steps, n_turns FROM rollouts ORDER BY n_steps").to_dicts()
    assert [(r["model"], r["n_steps"], r["n_turns"]) for r in rollouts] == [
        ("anthropic/claude-sonnet-4-5", 6, 2), ("SmolLM2-135M-Instruct", 7, 3), ("SmolLM2-135M-Instruct", 7, 3)]
    atif_rid = rollouts[1]["rollout_id"]
    steps = cat.sql(f"SELECT step_idx, role, pinned, tool_name FROM steps WHERE rollout_id = '{atif_rid}' "
                    "ORDER BY step_idx").to_dicts()
    assert [s["pinned"] for s in steps] == [True] * 4 + [False] * 3  # system, task, the paper read and its output
    assert steps[2]["tool_name"] == "read_file_chunk"
    toks = cat.sql(f"SELECT step_idx, int32s(token_ids) AS ids, float32s(logprobs) AS lps FROM step_events "
                   f"WHERE rollout_id = '{atif_rid}' ORDER BY step_idx").to_dicts()
    assert [t["ids"] for t in toks] == [[], SYS_IDS + TASK_IDS + HEADER, C1, OBS1 + HEADER, C2, OBS2 + HEADER, C3]
    assert np.allclose(toks[6]["lps"], atif_doc()["steps"][4]["metrics"]["logprobs"])
    assert toks[3]["lps"] is None
    swe_rid = rollouts[0]["rollout_id"]
    swe_steps = cat.sql(f"SELECT role, pinned, n_tokens FROM steps WHERE rollout_id = '{swe_rid}' "
                        "ORDER BY step_idx").to_dicts()
    assert [s["pinned"] for s in swe_steps] == [True, True, False, False, False, False]
    assert all(s["n_tokens"] is None for s in swe_steps)  # text-only: tokenized when a dataset is built
    # Importing the same files again sends nothing.
    assert cli(settings, "import", "trajectories", str(atif), "--task-id", "fre") == 0
    assert "already imported, skipped: 1 rows" in capsys.readouterr().out


def test_recorded_sampled_counts_reach_the_step_events():
    """An imported step with recorded ids keeps the sampled span the file gives (ATIF: the completion), so
    the markup appended after it carries no loss whatever tokenizer a build uses; a bad span is refused."""
    import pytest

    from producers.import_events import row_events
    from producers.import_rows import ImportOptions, RowError, parse_row

    doc = atif_doc()
    del doc["steps"][3]["observation"]
    doc["steps"][3]["metrics"]["prompt_token_ids"] = SYS_IDS + TASK_IDS + HEADER + C1 + OBS1 + HEADER
    doc["steps"][4]["metrics"]["prompt_token_ids"] = doc["steps"][3]["metrics"]["prompt_token_ids"] + C2 + HEADER
    obj = atif_row(doc, "fre")
    obj.pop("_warnings", None)
    row = parse_row(obj, 1, ImportOptions(), {})
    steps = [e.payload for e in row_events(row) if type(e).__name__ == "Step" and e.payload.role == "assistant"]
    assert [(p.n_generation_prompt, p.n_sampled) for p in steps] == [(0, len(C1)), (0, len(C2)), (0, len(C3))]
    bad = json.loads(json.dumps(obj))
    bad["messages"][2]["n_sampled"] = 99
    with pytest.raises(RowError, match="n_sampled"):
        parse_row(bad, 1, ImportOptions(), {})
