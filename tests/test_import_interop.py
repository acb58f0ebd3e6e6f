"""Imports that keep what the file says, on files written here from the peers' published schemas (Harbor ATIF
v1.5-v1.7, SWE-agent `.traj`): files sharing a session_id stay distinct rollouts; recorded token ids are
kept only whole and under their own fingerprint, never mixed with re-tokenized steps; ATIF tool definitions
reach the template's `<tools>`; sub-agent trajectories become rollouts linked to their parent; SWE-agent's
`tool_call_ids` link its tool results; a tool message naming no call is never silent; a build's tokenizer
check looks only at the rollouts it selects. The imports run for real (CLI, broker, sink, DuckDB)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from core.chat import ChatTokenizer
from consumers.materialize import build_version
from producers.import_events import row_events, token_plan
from producers.import_formats import detect, read_objects
from producers.import_rows import ImportOptions, RowError, parse_row
from schemas.errors import ConfigError
from store.catalog import Catalog
from tests.helpers import produce
from tests.test_import import cli, sink, task_event
from tests.test_import_formats import HEADER, atif_doc


def golden(n: int) -> dict:
    """A Harbor golden-file shape: its session_id normalized, like every other golden file's."""
    doc = atif_doc(session="NORMALIZED_SESSION_ID")
    doc["schema_version"] = "ATIF-v1.5"
    doc["steps"][4]["message"] = f"Done, variant {n}."
    return doc


def rows_of(path, task_id="fre"):
    out = list(read_objects(path, "auto", task_id))
    assert all(reason is None for _, _, reason in out), out
    return [parse_row(obj, line, ImportOptions(), {}) for line, obj, _ in out]


def test_files_sharing_a_session_id_stay_distinct_rollouts(settings, tmp_path, capsys):
    """Was: three golden files merged into one rollout (3 starts, 3 ends, step_idx repeated)."""
    produce(settings, [task_event("fre")])
    for n in range(3):
        (tmp_path / f"golden{n}.json").write_text(json.dumps(golden(n), indent=2))
        assert cli(settings, "import", "trajectories", str(tmp_path / f"golden{n}.json"), "--task-id", "fre") == 0
    sink(settings)  # only now: none of the three was archived when the next was imported
    cat = Catalog(settings)
    rollouts = cat.sql("SELECT rollout_id, n_steps FROM rollouts").to_dicts()
    assert len(rollouts) == 3 and all(r["n_steps"] == 7 for r in rollouts)
    per = cat.sql("SELECT rollout_id, count(*) AS n, count(DISTINCT step_idx) AS d FROM step_events "
                  "GROUP BY rollout_id").to_dicts()
    assert all(r["n"] == r["d"] == 7 for r in per)
    starts = cat.sql("SELECT rollout_id, count(*) AS n FROM rollout_started_events GROUP BY rollout_id").to_dicts()
    assert all(r["n"] == 1 for r in starts)
    capsys.readouterr()
    assert cli(settings, "import", "trajectories", str(tmp_path / "golden1.json"), "--task-id", "fre") == 0
    assert "already imported, skipped: 1 rows" in capsys.readouterr().out  # the same file again: a no-op


def test_a_row_id_reused_by_another_file_is_refused_before_anything_is_sent(settings, tmp_path, capsys):
    """Two files whose rows share an `id` (and task), imported one after the other with no sink in between
    (nothing archived yet): the second is refused, naming the first file and line (was: merged)."""
    from tests.test_import import paperbench_row

    produce(settings, [task_event("fre")])
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps(paperbench_row(id="traj-1")) + "\n")
    b.write_text(json.dumps(paperbench_row(id="other")) + "\n" + json.dumps(paperbench_row(id="traj-1", work=2)) + "\n")
    assert cli(settings, "import", "trajectories", str(a)) == 0
    capsys.readouterr()
    assert cli(settings, "import", "trajectories", str(b)) == 1
    out = capsys.readouterr().out
    assert "imported 1 rows" in out and f"line 2: this row's id was imported before from {a} line 1" in out
    sink(settings)
    assert Catalog(settings).sql("SELECT count(*) AS n FROM rollouts").to_dicts()[0]["n"] == 2


def test_recorded_ids_are_kept_whole_under_their_own_fingerprint(tmp_path):
    """Complete ATIF ids: kept with logprobs, fingerprint atif:AGENT/MODEL. Ids of only some messages (a
    pruned context): the rollout goes text-only, said as a warning (was: mixed with ids tokenized later
    under one fingerprint)."""
    path = tmp_path / "t.json"
    path.write_text(json.dumps(atif_doc()))
    row = rows_of(path)[0]
    mode, fp, warning = token_plan(row, None)
    assert (mode, fp, warning) == ("recorded", "atif:harbor-agent/SmolLM2-135M-Instruct", None)
    events = row_events(row)
    assert events[0].payload.tokenizer == fp and all(e.payload.token_ids is not None for e in events[1:8])
    pruned = atif_doc()
    pruned["steps"][3]["metrics"]["prompt_token_ids"] = [1, 99] + HEADER
    pruned["steps"][4]["metrics"]["prompt_token_ids"] = [1, 99] + HEADER + [43, 44, 2, 1, 52, 2] + HEADER
    path.write_text(json.dumps(pruned))
    row = rows_of(path)[0]
    mode, fp, warning = token_plan(row, None)
    assert (mode, fp) == ("text", "") and "cover 6 of its 7 messages" in warning
    events = row_events(row)
    steps = [e.payload for e in events if type(e).__name__ == "Step"]
    assert all(s.token_ids is None and s.logprobs is None for s in steps) and events[0].payload.tokenizer == ""


def test_with_a_tokenizer_the_whole_rollout_is_rendered_and_tools_reach_the_template(smollm2_dir, tmp_path):
    """--tokenizer MODEL_DIR and ids that are not its template's (another model's, or partial): the whole
    rollout is rendered with it, said so; agent.tool_definitions are rendered as the template's <tools>."""
    chat = ChatTokenizer(smollm2_dir)
    doc = atif_doc()
    doc["agent"]["tool_definitions"] = [{"type": "function", "function": {
        "name": "read_file_chunk", "description": "Read lines of a file.",
        "parameters": {"type": "object", "properties": {"file": {"type": "string"}}}}},
        {"name": "bash", "description": "Run a command.", "parameters": {"type": "object", "properties": {}}}]
    path = tmp_path / "t.json"
    path.write_text(json.dumps(doc))
    row = rows_of(path)[0]
    assert [t["function"]["name"] for t in row.tools] == ["read_file_chunk", "bash"]
    mode, fp, warning = token_plan(row, chat)
    assert (mode, fp) == ("render", chat.fingerprint) and "not what" in warning and "re-rendered" in warning
    events = row_events(row, chat)
    steps = [e.payload for e in events if type(e).__name__ == "Step"]
    ids = [np.frombuffer(s.token_ids, "<i4") if isinstance(s.token_ids, bytes) else np.asarray(s.token_ids)
           for s in steps]
    assert np.concatenate(ids).tolist() == chat.apply(
        [{"role": m["role"], **{k: v for k, v in m.items() if k != "role"}} for m in _chat(row)], row.tools).tolist()
    system = chat.decode(ids[0])
    assert "<tools>" in system and '"name": "bash"' in system
    assert all(s.logprobs is None for s in steps) and events[0].payload.tokenizer == chat.fingerprint


def _chat(row):
    from producers.import_events import chat_messages

    return chat_messages(row)


def test_sub_trajectories_are_their_own_rollouts_linked_to_the_parent(settings, tmp_path, capsys):
    """A summarizing sub-agent's trajectory (a file beside the parent's, ATIF v1.5 `trajectory_path`) and an
    embedded one (v1.7 `subagent_trajectories`): each its own rollout, group_id = the parent's rollout id
    (was: flattened into a user message the model never saw)."""
    produce(settings, [task_event("fre")])
    parent = atif_doc(session="NORMALIZED_SESSION_ID")
    parent["steps"][3]["observation"]["results"].append({"subagent_trajectory_ref": [
        {"session_id": "NORMALIZED_SESSION_ID", "trajectory_path": "trajectory.summarization-1-summary.json"}]})
    parent["steps"][3]["observation"]["results"].append({"subagent_trajectory_ref": [{"trajectory_id": "answers"}]})
    parent["steps"][3]["observation"]["results"].append({"subagent_trajectory_ref": [
        {"trajectory_path": "../outside.json"}]})
    summary = {"schema_version": "ATIF-v1.5", "session_id": "NORMALIZED_SESSION_ID",
               "agent": {"name": "terminus-2-summarization-summary", "version": "1", "model_name": "m"},
               "steps": [{"step_id": 1, "source": "user", "message": "Summarize the work so far."},
                         {"step_id": 2, "source": "agent", "message": "Read the paper; listed /home."}]}
    answers = copy.deepcopy(summary)
    answers.pop("session_id")
    answers["trajectory_id"] = "answers"
    answers["steps"][1]["message"] = "Answers: none."
    parent["subagent_trajectories"] = [answers]
    (tmp_path / "outside.json").write_text(json.dumps(summary))
    run = tmp_path / "run"
    run.mkdir()
    (run / "trajectory.summarization-1-summary.json").write_text(json.dumps(summary, indent=2))
    (run / "trajectory.json").write_text(json.dumps(parent, indent=2))
    rows = rows_of(run / "trajectory.json")
    assert len(rows) == 3 and rows[1].group_id == rows[2].group_id == rows[0].rollout_id
    assert not any("subagent_trajectory_ref" in m.text for m in rows[0].messages)
    assert any("../outside.json" in w and "not found" in w for w in rows[0].warnings)  # never read outside
    assert cli(settings, "import", "trajectories", str(run / "trajectory.json"), "--task-id", "fre") == 0
    err = capsys.readouterr().err
    assert "../outside.json" in err and "trajectory.json line 1" in err
    sink(settings)
    cat = Catalog(settings)
    kids = cat.sql(f"SELECT rollout_id, n_steps FROM rollouts WHERE group_id = '{rows[0].rollout_id}'").to_dicts()
    assert sorted(k["n_steps"] for k in kids) == [2, 2]


SWE_AGENT = {  # SWE-agent 1.x `.traj`: history (what the model saw), trajectory (steps), info
    "environment": "main",
    "trajectory": [{"action": "ls", "observation": "setup.py\nsrc", "response": "Let me look.", "thought": "Let me look.",
                    "execution_time": 0.1, "state": {"working_dir": "/testbed"}, "query": [], "extra_info": {}}],
    "history": [
        {"role": "system", "content": "You are a helpful assistant that can interact with a computer.", "agent": "main",
         "message_type": "system_prompt"},
        {"role": "user", "content": [{"type": "text", "text": "<uploaded_files>/testbed</uploaded_files> Fix the bug."}],
         "agent": "main", "message_type": "observation"},
        {"role": "assistant", "content": "Let me look.", "thought": "Let me look.", "action": "ls", "agent": "main",
         "tool_calls": [{"function": {"arguments": "{\"command\":\"ls\"}", "name": "bash"}, "id": "call_a",
                         "type": "function"}], "message_type": "action"},
        {"role": "tool", "content": [{"type": "text", "text": "setup.py\nsrc"}], "agent": "main",
         "message_type": "observation", "tool_call_ids": ["call_a"]},
        {"role": "assistant", "content": "Submitting.", "thought": "Submitting.", "action": "submit", "agent": "main",
         "tool_calls": [{"function": {"arguments": "{}", "name": "submit"}, "id": "call_b", "type": "function"}],
         "message_type": "action"},
        {"role": "tool", "content": "diff --git a/src/x.py b/src/x.py", "agent": "main", "message_type": "observation",
         "tool_call_ids": ["call_b"]},
        {"role": "assistant", "content": "Done.", "agent": "main", "message_type": "action"}],
    "info": {"submission": "diff --git a/src/x.py b/src/x.py", "exit_status": "submitted",
             "model_stats": {"instance_cost": 0.1, "api_calls": 3}, "swe_agent_version": "1.1.0"},
    "replay_config": "{}",
}


def test_swe_agent_traj_is_a_format(settings, tmp_path):
    """Was: refused ("`messages` must be a non-empty list"); its tool_call_ids (plural) left tool steps unlinked."""
    produce(settings, [task_event("fre")])
    assert detect(SWE_AGENT) == "swe-agent"
    path = tmp_path / "astropy__astropy-12907.traj"
    path.write_text(json.dumps(SWE_AGENT, indent=2))
    row = rows_of(path)[0]
    assert [m.tool_call_id for m in row.messages if m.role == "tool"] == ["call_a", "call_b"] and not row.warnings
    assert cli(settings, "import", "trajectories", str(path), "--task-id", "fre") == 0
    sink(settings)
    steps = Catalog(settings).sql("SELECT role, tool_call_id FROM step_events ORDER BY step_idx").to_dicts()
    assert [s["role"] for s in steps] == ["system", "user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert [s["tool_call_id"] for s in steps if s["role"] == "tool"] == ["call_a", "call_b"]
    bad = copy.deepcopy(SWE_AGENT)
    bad["history"][3]["tool_call_ids"] = ["call_a", "call_x"]
    path.write_text(json.dumps(bad))
    assert "tool_call_ids must list the one call" in next(read_objects(path, "auto", "fre"))[2]


def test_a_tool_message_that_names_no_call_is_never_silent():
    one = {"task_id": "fre", "messages": [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "bash", "arguments": "{}"}}]},
        {"role": "tool", "content": "ok"}, {"role": "assistant", "content": "done"}]}
    row = parse_row(one, 1, ImportOptions(), {})
    assert row.messages[2].tool_call_id == "c1" and "names no tool call" in row.warnings[0]
    two = copy.deepcopy(one)
    two["messages"][1]["tool_calls"].append({"id": "c2", "type": "function", "function": {"name": "ls", "arguments": ""}})
    two["messages"].insert(2, {"role": "tool", "tool_call_id": "c2", "content": "x"})
    assert parse_row(two, 1, ImportOptions(), {}).messages[3].tool_call_id == "c1"  # the one call left open
    two["messages"].pop(2)
    with pytest.raises(RowError, match="made 2 unanswered calls"):
        parse_row(two, 1, ImportOptions(), {})


def test_a_builds_tokenizer_check_looks_only_at_the_rollouts_it_selects(settings, smollm2_dir):
    """A rollout with recorded ids on some steps and text on others (task b) refuses only the builds that
    select it (was: every tokenizer= build in the home)."""
    from schemas.arrow import encode_array
    from schemas.events import (RolloutEnded, RolloutEndedPayload, RolloutStarted, RolloutStartedPayload, Step,
                                StepPayload, new_event)

    def rollout(rid, task, ids_on_first):
        evs = [new_event(RolloutStarted, rollout_id=rid, payload=RolloutStartedPayload(task_id=task, group_id=rid,
                                                                                      timeout_s=60.0))]
        for i, (role, text) in enumerate([("system", "sys"), ("user", "task"), ("assistant", "answer")]):
            tok = encode_array(np.array([1, 2, 3], np.int32), "int32") if ids_on_first and i == 0 else None
            evs.append(new_event(Step, rollout_id=rid, payload=StepPayload(step_idx=i, role=role, content=text,
                                                                          pinned=i < 2, token_ids=tok)))
        return evs + [new_event(RolloutEnded, rollout_id=rid, payload=RolloutEndedPayload(status="finished", n_steps=3))]

    produce(settings, [task_event("a"), task_event("b")] + rollout("ra", "a", False) + rollout("rb", "b", True))
    sink(settings)
    cfg = {"tokenizer": str(smollm2_dir), "max_tokens": 4096}
    build_version(settings.home, "only-a", "sft", dict(cfg, tasks=["a"]))
    with pytest.raises(ConfigError, match="rollout rb has recorded token ids and text-only steps"):
        build_version(settings.home, "all", "sft", cfg)


@pytest.fixture
def tiny_chat_dir(tmp_path):
    """A tiny model directory: a byte-level tokenizer.json (256 byte tokens and the ChatML markers, no merges)
    and the shipped tool-aware ChatML template, so the template's `<tools>` block can be read back."""
    import shutil

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from trainer.model_import import TEMPLATE_FILE

    d = tmp_path / "tiny-chat"
    d.mkdir()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                               merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                         "eos_token": "<|im_end|>"}))
    shutil.copy(TEMPLATE_FILE, d / "chat_template.jinja")
    return d


def test_tool_definitions_imported_text_only_reach_the_template_of_a_build(settings, tmp_path, tiny_chat_dir, capsys):
    """An ATIF file with agent.tool_definitions imported WITHOUT --tokenizer (text only): rollout_started keeps
    the schemas, and a build with tokenizer=MODEL_DIR renders them as the template's <tools> block (was: the
    events had no tools, the block was missing unless the import itself had --tokenizer)."""
    from consumers.materialize import build_version
    from trainer.data import DatasetReader

    produce(settings, [task_event("fre")])
    tools = [{"type": "function", "function": {"name": "read_file_chunk", "description": "Read lines of a file.",
                                               "parameters": {"type": "object",
                                                              "properties": {"file": {"type": "string"}}}}},
             {"type": "function", "function": {"name": "bash", "description": "Run a command.",
                                               "parameters": {"type": "object", "properties": {}}}}]
    doc = atif_doc(session="with-tools")
    for step in doc["steps"]:  # no recorded ids: a text-only import, tokenized when a dataset is built
        step.pop("metrics", None)
    doc["agent"]["tool_definitions"] = tools
    plain = atif_doc(session="no-tools")
    for step in plain["steps"]:
        step.pop("metrics", None)
    (tmp_path / "t.json").write_text(json.dumps(doc))
    (tmp_path / "p.json").write_text(json.dumps(plain))
    for f in ("t.json", "p.json"):
        assert cli(settings, "import", "trajectories", str(tmp_path / f), "--task-id", "fre") == 0
    assert "tool definitions" not in capsys.readouterr().err  # kept: nothing to warn about
    sink(settings)
    cat = Catalog(settings)
    started = {r["scaffold"] + str(i): r for i, r in enumerate(cat.sql(
        "SELECT rollout_id, scaffold, tools FROM rollout_started_events ORDER BY tools NULLS LAST").to_dicts())}
    kept, none = started["import0"], started["import1"]
    assert json.loads(kept["tools"]) == tools and none["tools"] is None

    out = build_version(settings.home, "tools", "sft", {"tokenizer": str(tiny_chat_dir), "max_tokens": 8192})
    chat = ChatTokenizer(tiny_chat_dir)
    reader = DatasetReader(settings.home, out.ref)
    texts = {reader.rollout_id[i].as_py(): chat.decode(reader.sample(i)[0]) for i in range(len(reader))}
    with_tools = texts[kept["rollout_id"]]
    block = "<tools>\n" + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools) + "\n</tools>"
    assert block in with_tools and with_tools.index(block) < with_tools.index("<|im_end|>")  # in the system message
    assert "<tools>" not in texts[none["rollout_id"]]
    # exactly what apply_chat_template gives for the imported step contents and those tools
    steps = cat.sql(f"SELECT role, content FROM steps WHERE rollout_id = '{kept['rollout_id']}' ORDER BY step_idx"
                    ).to_dicts()
    assert with_tools == chat.decode(chat.apply(steps, tools))
