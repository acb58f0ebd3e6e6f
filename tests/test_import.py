"""`klong import trajectories`: OpenAI chat-messages JSONL -> rollout events -> archive -> views -> SFT dataset.

Everything runs for real: the CLI, the session's Tansu broker, the archive sink, DuckDB views, the dataset
builder and (for --tokenizer) a real Hugging Face tokenizer.json trained here offline. The trajectories
have the shape of public agent-trajectory sets on PaperBench: a system prompt, the task, the agent reading
/home/paper/paper.md in chunks with read_file_chunk, then working with bash.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from consumers.sink import Sink
from klong.cli import main
from producers.importer import ImportOptions, parse_row, render
from producers.paper_prefix import reads_paper
from schemas.events import TaskPayload, TaskRegistered, ToolCall, new_event
from store.catalog import Catalog
from store.datasets import open_version
from tests.helpers import produce

SYSTEM = "You are a helpful agent attempting to solve a task. You have several functions available to help with finishing your task."
TASK = ("You are tasked with reproducing a research paper. The paper is at /home/paper/paper.md, an addendum at "
        "/home/paper/addendum.md. Write your reproduction to /home/submission with a reproduce.sh.")


def call(cid: str, name: str, **args) -> dict:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def paperbench_row(task_id="fre", chunks=3, work=4, **extra) -> dict:
    """A PaperBench-shaped trajectory: system, task, paper read in `chunks` chunks + the addendum by cat,
    then `work` turns of real work. Its paper-reading prefix is 2 + 2 * chunks + 2 steps."""
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TASK}]
    for c in range(chunks):
        msgs.append({"role": "assistant", "content": "I'll start by reading the paper." if c == 0 else None,
                     "tool_calls": [call(f"read{c}", "read_file_chunk", file="/home/paper/paper.md",
                                         start_line=1 + 50 * c, max_lines=50)]})
        msgs.append({"role": "tool", "tool_call_id": f"read{c}", "content": f"# Section {c}\nWe propose FRE, chunk {c} ..."})
    msgs += [{"role": "assistant", "content": None, "tool_calls": [call("add", "bash", cmd="cat /home/paper/addendum.md | head -n 80")]},
             {"role": "tool", "tool_call_id": "add", "content": "Addendum: use the small config."}]
    for w in range(work):
        msgs.append({"role": "assistant", "content": f"Step {w}: writing code.",
                     "tool_calls": [call(f"w{w}", "bash", cmd=f"mkdir -p /home/submission && echo {w} > /home/submission/f{w}.py")]})
        msgs.append({"role": "tool", "tool_call_id": f"w{w}", "content": f"ok {w}"})
    msgs.append({"role": "assistant", "content": "The reproduction is complete."})
    return {"task_id": task_id, "messages": msgs, **extra}


def task_event(task_id: str, split: str = "train", blacklist=()):
    return new_event(TaskRegistered, payload=TaskPayload(task_id=task_id, title=task_id, split=split,
                                                         blacklist=list(blacklist)))


def cli(settings, *argv) -> int:
    return main([*argv, "--home", str(settings.home), "--bootstrap-servers", settings.bootstrap_servers,
                 "--topic-prefix", settings.topics.prefix, "--quiet"])


def sink(settings) -> None:
    Sink(settings).run(until_idle=True, idle_s=0.3)


def parse(obj, opts=ImportOptions()):
    return parse_row(obj, 1, opts, {})


# ---- the prefix rule, on real-shaped trajectories (pure) -------------------------------------------


def test_prefix_rule_on_paperbench_shaped_trajectories():
    row = parse(paperbench_row(chunks=3))
    assert row.prefix == 2 + 2 * 3 + 2  # system, task, 3 chunk reads + outputs, cat addendum + output
    assert [m.role for m in row.messages[:row.prefix]] == ["system", "user"] + ["assistant", "tool"] * 4
    assert row.messages[row.prefix].role == "assistant" and "mkdir" in row.messages[row.prefix].calls[0].arguments
    # overrides: no paper rule, --prefix-steps, a row's pinned_steps (wins over --prefix-steps)
    assert parse(paperbench_row(), ImportOptions(paper_rule=False)).prefix == 2
    assert parse(paperbench_row(), ImportOptions(prefix_steps=5)).prefix == 5
    assert parse(paperbench_row(pinned_steps=1), ImportOptions(prefix_steps=5)).prefix == 1
    assert parse(paperbench_row(pinned_steps=0)).prefix == 0
    # no system message; reading stops at a text-only assistant message
    msgs = paperbench_row()["messages"][1:]
    msgs.insert(1, {"role": "assistant", "content": "Let me think first."})
    assert parse({"task_id": "fre", "messages": msgs}).prefix == 1


@pytest.mark.parametrize("name, args, reads", [
    ("read_file_chunk", {"file": "/home/paper/paper.md", "start_line": 1, "max_lines": 50}, True),
    ("bash", {"cmd": "cat /home/paper/paper.md | head -200"}, True),
    ("bash", {"cmd": "sed -n '1,200p' paper.md"}, True),
    ("bash", {"cmd": "ls -la /home/paper && cat /home/paper/addendum.md"}, True),
    ("bash", {"cmd": "pdftotext /home/paper/paper.pdf - | grep -n Algorithm"}, True),
    ("str_replace_editor", {"command": "view", "path": "/home/paper/paper.md"}, True),
    ("bash", {"cmd": "python /home/paper/train.py"}, False),  # runs code, does not read
    ("bash", {"cmd": "cp /home/paper/paper.md /home/submission/"}, False),
    ("bash", {"cmd": "cat /home/submission/README.md"}, False),  # not a paper file
    ("read_file_chunk", {"file": "/home/submission/main.py"}, False),
    ("bash", {"cmd": "cat mypaper.md"}, False),
    ("python", {"code": "open('/home/paper/paper.md').read()"}, False),
    ("bash", {"cmd": "cat /home/paper/paper.md > /home/submission/notes.md"}, False),  # writes a file
    ("bash", {"cmd": "cat /home/paper/paper.md>>notes.md"}, False),
    ("bash", {"cmd": "grep -n 'a > b' /home/paper/paper.md"}, True),  # a quoted > is no redirection
    ("bash", {"cmd": "sed -i 's/a/b/' /home/paper/paper.md"}, False),  # edits in place
    ("bash", {"cmd": "find /home/paper -name '*.md' -delete"}, False),
    ("bash", "cat /home/paper/paper.md", True),  # the raw command string as the arguments
])
def test_which_tool_calls_read_the_paper(name, args, reads):
    arguments = args if isinstance(args, str) else json.dumps(args)
    assert reads_paper(ToolCall(name=name, arguments=arguments)) is reads


def test_several_tool_calls_in_one_message_and_legacy_function_call():
    row = paperbench_row(chunks=1, work=1)
    # one message reading two chunks at once: both outputs follow, the whole exchange is pinned
    row["messages"][2]["tool_calls"].append(call("read1b", "read_file_chunk", file="/home/paper/paper.md", start_line=51))
    row["messages"].insert(4, {"role": "tool", "tool_call_id": "read1b", "content": "chunk b"})
    r = parse(row)
    assert r.prefix == 2 + 3 + 2
    step = r.messages[2]
    assert [c.id for c in step.calls] == ["read0", "read1b"]
    text = render(step)  # text first, then every call, in order: the first is also the step's tool_call
    assert text.startswith("I'll start by reading the paper.\n<tool_call>\n")
    assert text.count("<tool_call>") == 2 and text.index('"start_line": 1') < text.index('"start_line": 51')
    # a read mixed with real work in one message ends the prefix there
    row["messages"][2]["tool_calls"][1] = call("read1b", "bash", cmd="pip install torch")
    assert parse(row).prefix == 2
    legacy = {"task_id": "t", "messages": [{"role": "user", "content": "go"}, {"role": "assistant", "content": None,
              "function_call": {"name": "read_file_chunk", "arguments": '{"file": "/home/paper/paper.md"}'}},
              {"role": "tool", "content": "paper"}, {"role": "assistant", "content": "done"}]}
    assert parse(legacy).prefix == 3 and parse(legacy).messages[1].calls[0].name == "read_file_chunk"


# ---- import end to end: bad rows, views, re-import, SFT dataset ---------------------------------------


BAD_ROWS = [  # (line text, words the reason must contain)
    ('{"task_id": "fre", "messages": [', "not valid JSON"),
    ('[1, 2, 3]', "must be a JSON object"),
    ('{"task_id": "fre"}', "`messages` must be a non-empty list"),
    (json.dumps({"task_id": "fre", "messages": [{"role": "robot", "content": "beep"}]}), "unknown role 'robot'"),
    (json.dumps({"task_id": "fre", "messages": [{"role": "user", "content": "go"}, {"role": "tool", "content": "out"},
                                                {"role": "assistant", "content": "x"}]}),
     "must follow an assistant message with tool_calls"),
    (json.dumps({"task_id": "fre", "messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "x"}]}),
     "content must be a string or a list of text parts, got int"),
    (json.dumps(paperbench_row(task_id="no-such-task")), "task 'no-such-task' is not registered"),
    (json.dumps(paperbench_row(score=1.5)), "`score` must be a number in [0, 1]"),
    (json.dumps(paperbench_row(score="0.5")), "`score` must be a number in [0, 1]"),
    (json.dumps({"task_id": "fre", "messages": [
        {"role": "user", "content": "go"}, {"role": "assistant", "content": None, "tool_calls": [call("c1", "bash", cmd="ls")]},
        {"role": "tool", "tool_call_id": "c9", "content": "x"}]}), "tool_call_id 'c9' answers no tool call"),
    (json.dumps({"task_id": "fre", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                                                {"role": "assistant", "content": "x"}]}), "content part 0 is not a text part"),
    (json.dumps({"task_id": "fre", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}),
     "no assistant message"),
    (json.dumps(paperbench_row(id="traj-a")), "`id` 'traj-a' is already used by line"),
    (json.dumps(paperbench_row(pinned_steps=99)), "`pinned_steps` must be an integer in [0, 19]"),
    (json.dumps({"task_id": "fre", "messages": [{"role": "user", "content": "u", "tool_calls": [call("c", "bash", cmd="ls")]},
                                                {"role": "assistant", "content": "x"}]}), "only assistant messages make tool calls"),
    (b'{"task_id": "fre", "messages": "\xff"}', "not valid UTF-8"),
    (json.dumps(paperbench_row(model="\ud800")), "unpaired surrogate"),
    (json.dumps({"task_id": "fre", "messages": [{"role": "user", "content": "go"}, {
        "role": "assistant", "content": None, "tool_calls": [call("c", "bash", cmd="x" * 300_000)]}]}),
     "tool_calls[0] arguments are 300011 characters (limit 225000)"),  # could never be sent: refused before anything is
]


def write_file(path, rows_and_bad) -> dict[int, str]:
    """Writes rows (dicts) and bad lines (str) with a blank line in between; returns line -> reason words."""
    lines, expect = [], {}
    for item in rows_and_bad:
        if isinstance(item, tuple):
            expect[len(lines) + 1] = item[1]
            lines.append(item[0] if isinstance(item[0], bytes) else item[0].encode())
        else:
            lines.append(json.dumps(item).encode())
        lines.append(b"  ")  # blank lines are not rows
    path.write_bytes(b"\n".join(lines) + b"\n")
    return expect


def test_import_file_with_malformed_rows_then_views_reimport_and_sft_dataset(settings, tmp_path, capsys):
    produce(settings, [task_event("fre"), task_event("paper-eval", "eval")])
    a = paperbench_row(chunks=3, work=4, id="traj-a", score=0.75, model="teacher-a")
    b = paperbench_row(chunks=2, work=3, model="teacher-b")  # no id, no score: hash-derived rollout id
    c = paperbench_row(chunks=1, work=2, group_id="g-c", pinned_steps=3, model="teacher-c", score=0)
    e = paperbench_row(task_id="paper-eval", model="teacher-e")
    path = tmp_path / "teacher.jsonl"
    expect = write_file(path, [a, BAD_ROWS[0], b, *BAD_ROWS[1:], b, c, e])  # b twice: two rollouts
    good = {"teacher-a": (a, 10), "teacher-b": (b, 8), "teacher-c": (c, 3), "teacher-e": (e, 10)}

    # --strict with bad rows, and --dry-run: nothing is sent
    assert cli(settings, "import", "trajectories", str(path), "--strict") == 2
    assert "bad row(s), nothing imported (--strict)" in capsys.readouterr().err
    assert cli(settings, "import", "trajectories", str(path), "--dry-run") == 1
    out = capsys.readouterr().out
    assert "would import 5 rows" in out and f"skipped {len(BAD_ROWS)} bad rows" in out
    for line, words in expect.items():  # every bad row, with its line number and what is wrong
        assert f"line {line}: " in out and words in out.split(f"line {line}: ")[1].splitlines()[0], (line, words)

    assert cli(settings, "import", "trajectories", str(path)) == 1  # imported, but some rows were skipped
    io = capsys.readouterr()
    assert "imported 5 rows as rollouts (79 steps" in io.out and "paper-eval' is in the eval split" in io.err
    assert cli(settings, "import", "trajectories", str(path)) == 1  # again before the sink ran: same event ids
    capsys.readouterr()
    sink(settings)

    cat = Catalog(settings)
    rollouts = cat.sql("SELECT * FROM rollouts ORDER BY model").to_dicts()
    assert [r["model"] for r in rollouts] == ["teacher-a", "teacher-b", "teacher-b", "teacher-c", "teacher-e"]
    assert all(r["status"] == "finished" and r["scaffold"] == "import" and r["n_turns"] > 0 for r in rollouts)
    assert [r["group_id"] for r in rollouts] == ["fre", "fre", "fre", "g-c", "paper-eval"]
    assert [r["final_score"] for r in rollouts] == [0.75, None, None, 0.0, None]
    assert len({r["rollout_id"] for r in rollouts}) == 5
    for r in rollouts:  # every step once, in message order, with the pinned prefix of the rule / override
        row, prefix = good[r["model"]]
        steps = cat.sql(f"SELECT * FROM steps WHERE rollout_id = '{r['rollout_id']}' ORDER BY step_idx").to_dicts()
        assert r["n_steps"] == len(steps) == len(row["messages"])
        assert [s["step_idx"] for s in steps] == list(range(len(steps)))
        assert [s["role"] for s in steps] == [m["role"] for m in row["messages"]]
        assert [s["pinned"] for s in steps] == [i < prefix for i in range(len(steps))]
        assert all(s["n_tokens"] is None for s in steps)  # text-only: tokenized when a dataset is built
        first = row["messages"][2]["tool_calls"][0]
        assert (steps[2]["tool_name"], steps[2]["tool_arguments"]) == (first["function"]["name"], first["function"]["arguments"])
        assert steps[3]["tool_call_id"] == "read0" and steps[3]["content"] == row["messages"][3]["content"]
    assert cat.scalar("SELECT count(*) FROM steps") == 19 + 15 * 2 + 11 + 19
    assert cat.scalar("SELECT count(*) FROM steps WHERE rollout_id NOT IN (SELECT rollout_id FROM rollouts)") == 0
    assert cat.sql("SELECT judge_model, score FROM judge_results ORDER BY score").rows() == [("import", 0.0), ("import", 0.75)]

    # importing the same file again once archived: nothing is sent at all
    raw = cat.scalar("SELECT count(*) FROM _raw_step")
    assert cli(settings, "import", "trajectories", str(path)) == 1
    out = capsys.readouterr().out
    assert "imported 0 rows" in out and "already imported, skipped: 5 rows" in out
    sink(settings)
    assert Catalog(settings).scalar("SELECT count(*) FROM _raw_step") == raw
    # a row id imported before with other content is refused, not mixed in
    a2 = {**a, "score": 0.5}
    write_file(tmp_path / "changed.jsonl", [a2])
    assert cli(settings, "import", "trajectories", str(tmp_path / "changed.jsonl")) == 1
    assert "line 1: this row's id was imported before with different content" in capsys.readouterr().out

    # the README flow: an SFT dataset from the imported trajectories; every window starts with the pinned steps
    assert cli(settings, "dataset", "build", "teacher-sft", "--kind", "sft", "max_tokens=1200", "overlap_turns=1") == 0
    ref = capsys.readouterr().out.strip()
    version = open_version(settings.home, ref)
    m = version.manifest
    assert m["drops"]["eval_task"]["count"] == 1 and m["counts"]["rollouts"] == 4
    contents = {r["rollout_id"]: cat.sql(f"SELECT content, pinned FROM steps WHERE rollout_id = '{r['rollout_id']}' "
                                         "ORDER BY step_idx").to_dicts() for r in rollouts}
    samples = list(version)
    assert {s.rollout_id for s in samples} == {r["rollout_id"] for r in rollouts[:4]}
    assert any(s.window_idx > 0 for s in samples)  # long enough to be split
    for s in samples:
        prefix = "".join(x["content"] for x in contents[s.rollout_id] if x["pinned"]).encode()
        assert bytes(s.input_ids[:len(prefix)].astype(np.uint8)) == prefix
    rows = cat.sql(f"SELECT s.rollout_id, s.first_step, r.model FROM samples s JOIN rollouts r USING (rollout_id) "
                   f"WHERE s.dataset = 'teacher-sft'").to_dicts()
    assert all(x["first_step"] >= good[x["model"]][1] for x in rows)


def test_empty_or_missing_file_is_an_error(settings, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert cli(settings, "import", "trajectories", str(empty)) == 2
    assert "has no rows" in capsys.readouterr().err
    assert cli(settings, "import", "trajectories", str(tmp_path / "nope.jsonl")) == 2
    assert "no such file" in capsys.readouterr().err


def test_tokenizer_computes_token_ids_at_import(settings, tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    row = paperbench_row(chunks=2, work=2, id="tok-1", score=0.5)
    tok = tokenizers.Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([m["content"] or "" for m in row["messages"]] + [TASK, "tool_call name arguments"],
                            trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    tok_path = tmp_path / "tokenizer.json"
    tok.save(str(tok_path))
    produce(settings, [task_event("fre")])
    write_file(tmp_path / "t.jsonl", [row])
    assert cli(settings, "import", "trajectories", str(tmp_path / "t.jsonl"), "--tokenizer", str(tok_path)) == 0
    capsys.readouterr()
    sink(settings)
    steps = Catalog(settings).sql("SELECT s.content, s.n_tokens, t.token_ids FROM steps s JOIN step_tokens t "
                                  "USING (rollout_id, step_idx) ORDER BY step_idx").to_dicts()
    assert len(steps) == len(row["messages"])
    for s in steps:  # the ids the tokenizer gives for the step content, recorded at import
        assert list(s["token_ids"]) == tok.encode(s["content"], add_special_tokens=False).ids
        assert s["n_tokens"] == len(s["token_ids"]) > 0
    assert cli(settings, "import", "trajectories", str(tmp_path / "t.jsonl"), "--tokenizer", str(tmp_path / "nope.json")) == 2
    assert "does not exist" in capsys.readouterr().err


def readme_commands() -> list[list[str]]:
    """The commands of README's "Importing teacher trajectories" block, as argv lists."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("### Importing teacher trajectories", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]  # its first line marks it an example


def test_readme_import_and_blacklist_commands(settings, tmp_path):
    """Runs the README block as written (each `klong ...` a real subprocess) in a folder holding its files."""
    from tests.test_tasks import make_task

    make_task(tmp_path / "papers", "fre", blacklist="https://github.com/kvfrans/fre\n")
    clean = paperbench_row(id="t-1", score=0.6)
    leak = paperbench_row(id="t-2", score=0.4)
    leak["messages"][12]["tool_calls"][0]["function"]["arguments"] = json.dumps({"cmd": "git clone https://github.com/kvfrans/fre"})
    (tmp_path / "teacher.jsonl").write_text(json.dumps(clean) + "\n" + json.dumps(leak) + "\n")
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    tok = tokenizers.Tokenizer(models.WordLevel({"[UNK]": 0, "paper": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    env = {**os.environ, "KLONG_HOME": str(settings.home), "KLONG_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
           "KLONG_TOPIC_PREFIX": settings.topics.prefix, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    outputs = []
    commands = readme_commands()
    assert len(commands) == 6 and all(c[0] == "klong" for c in commands)
    for argv in commands:
        done = subprocess.run([sys.executable, "-m", "klong", *argv[1:]], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, (argv, done.stdout, done.stderr)
        outputs.append(done.stdout)
    assert "imported 2 rows as rollouts" in outputs[1] and "would import 2 rows" in outputs[2]
    assert outputs[4].strip() == "teacher-sft@1"
    m = open_version(settings.home, "teacher-sft@1").manifest
    assert m["drops"]["blacklisted"]["count"] == 1 and m["counts"]["rollouts"] == 1
    assert "https://github.com/kvfrans/fre | tool_call | https://github.com/kvfrans/fre" in outputs[5]
    assert "(1 row)" in outputs[5]


def test_an_import_torn_by_a_crash_is_completed_by_the_next_run(settings, tmp_path, capsys):
    """A process killed mid-row leaves the first events of a row in Kafka; the row is not 'already imported'
    until its last event (rollout_ended) is archived, so the next run sends it again and completes it."""
    from producers.importer import read_rows, row_events

    produce(settings, [task_event("fre")])
    path = tmp_path / "t.jsonl"
    write_file(path, [paperbench_row(id="torn", score=0.5), paperbench_row(id="whole")])
    (_, torn, _), _ = list(read_rows(path, ImportOptions()))
    produce(settings, row_events(torn)[:6])  # started + 5 steps, then the "crash"
    sink(settings)
    cat = Catalog(settings)
    assert cat.sql("SELECT status, steps_seen FROM rollouts").rows() == [("running", 5)]
    assert cli(settings, "import", "trajectories", str(path)) == 0
    assert "imported 2 rows" in capsys.readouterr().out
    sink(settings)
    rows = Catalog(settings).sql("SELECT status, n_steps, steps_seen, final_score FROM rollouts ORDER BY final_score").rows()
    assert rows == [("finished", 19, 19, 0.5), ("finished", 19, 19, None)]
    assert cli(settings, "import", "trajectories", str(path)) == 0
    assert "already imported, skipped: 2 rows" in capsys.readouterr().out
