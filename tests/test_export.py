"""`klong dataset export`: exact pre-tokenized exports (tokens and loss masks equal the trainer's reader for
every sample), loaded by one `datasets.load_dataset("parquet", ...)` call, and TRL's SFTTrainer trains on
one without conversion code. Datasets: the trainer tests' `train_home` (real broker, sink, archive, build)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from schemas.errors import ConfigError
from tests.test_trainer_data import train_home  # noqa: F401  (the session fixture)
from trainer.data import DatasetReader
from trainer.export import FORMATS, MANIFEST, export_dataset

MASK = {"trl": "assistant_masks", "hf": "loss_mask", "verl": "response_mask"}
LOGPROBS = {"trl": "old_per_token_logps", "hf": "logprobs", "verl": "old_log_probs"}


def _load(directory):
    import datasets

    return datasets.load_dataset("parquet", data_files=str(directory / "data" / "*.parquet"), split="train",
                                 cache_dir=str(directory.parent / "hf-cache"))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("ref", ["sft@1", "rl@1"])
def test_export_round_trips_every_sample(train_home, tmp_path, fmt, ref):  # noqa: F811
    # Small chunks and shards, so gathering across chunk and file boundaries is exercised too.
    report = export_dataset(train_home.home, ref, fmt, tmp_path / "out", shard_tokens=3000, chunk_tokens=700)
    assert len(report.files) > 1
    rows = _load(tmp_path / "out")
    reader = DatasetReader(train_home.home, ref, need_behaviour=False)  # klong train's default (recompute)
    assert len(rows) == len(reader) == report.samples > 20
    rl = reader.kind == "rl"
    lost = 0
    for j in range(len(reader)):
        row = rows[j]
        mb = reader.batch(np.array([j]))
        n = int(mb.lengths[0])
        assert (row["rollout_id"], row["window_idx"]) == (reader.rollout_id[j].as_py(), int(reader.window_idx[j]))
        assert row["input_ids"] == mb.input_ids[0, :n].tolist()
        assert row[MASK[fmt]] == mb.loss_mask[0, :n].tolist()
        if fmt == "trl":
            assert row["completion_mask"] == row["assistant_masks"]
        if fmt == "hf":
            assert row["labels"] == [t if m else -100 for t, m in zip(row["input_ids"], row["loss_mask"])]
        if fmt == "verl":
            assert row["position_ids"] == list(range(n)) and row["uid"] == row["group_id"]
        if rl:
            assert row["has_logprob"] == mb.has_logprob[0, :n].tolist()
            lost += sum(1 for m, h in zip(row[MASK[fmt]], row["has_logprob"]) if m and not h)
            assert np.allclose(np.array(row[LOGPROBS[fmt]])[mb.loss_mask[0, :n] == 1],
                               mb.logprobs[0, :n][mb.loss_mask[0, :n] == 1])
            want_adv = mb.advantage[0, :n]
            got = np.array(row["advantages"]) if fmt == "verl" else np.array(row["advantages"]) * mb.loss_mask[0, :n]
            assert np.allclose(got, want_adv, atol=1e-6)
    assert report.loss_tokens == int(reader.trainable.sum())
    if rl:
        assert lost == int(reader.n_no_logprob.sum()) > 0  # r05's text-only action: trained, marked no logprob
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["content_hash"] == reader.content_hash and manifest["format"] == fmt
    if fmt == "verl":  # the class verl's data.custom_cls loads (tests/test_export_peers.py runs it)
        assert (tmp_path / "out" / manifest["verl_custom_cls"]["path"]).is_file()


def test_export_refuses_bad_requests(train_home, tmp_path):  # noqa: F811
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(ConfigError, match="not an empty directory"):
        export_dataset(train_home.home, "sft@1", "trl", tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    with pytest.raises(ConfigError, match="choose one of"):
        export_dataset(train_home.home, "sft@1", "parquet", tmp_path / "new")
    cli = subprocess.run([sys.executable, "-m", "klong.cli", "dataset", "export", "nope@1", "--format", "trl",
                          "-o", str(tmp_path / "o"), "--home", str(train_home.home)], capture_output=True, text=True)
    assert cli.returncode == 2 and "no dataset named 'nope'" in cli.stderr
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


def test_trl_sft_trainer_trains_on_an_export(train_home, tmp_path):  # noqa: F811
    """The CLI writes the export; TRL's SFTTrainer takes it as loaded, with the tiny model, for 2 steps; the
    labels TRL builds mark exactly the trainer's loss tokens."""
    import torch
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    from trainer.config import ModelConfig
    from trainer.model import load_model

    out = tmp_path / "trl"
    cli = subprocess.run([sys.executable, "-m", "klong.cli", "dataset", "export", "sft@1", "--format", "trl",
                          "-o", str(out), "--home", str(train_home.home), "-q", "--messages"], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert "exported sft@1" in cli.stdout
    rows = _load(out)
    model, _ = load_model(ModelConfig(name="tiny", vocab_size=512, hidden_size=64, intermediate_size=128, layers=2,
                                      heads=4, kv_heads=2), max_positions=512)
    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0}, unk_token="<pad>")),
                                  pad_token="<pad>")  # the ids are already there: TRL only needs a pad token
    args = SFTConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4, report_to=[],
                     learning_rate=1e-3, logging_steps=1, save_strategy="no", use_cpu=True, dataset_num_proc=None,
                     max_length=None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tok)
    prepared = trainer.train_dataset
    reader = DatasetReader(train_home.home, "sft@1")
    for j in range(len(reader)):
        mb = reader.batch(np.array([j]))
        labels = np.array(prepared[j]["labels"])
        assert ((labels != -100).astype(np.uint8) == mb.loss_mask[0, :int(mb.lengths[0])]).all()
    result = trainer.train()
    assert result.global_step == 2 and np.isfinite(result.training_loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _agent_rollout(rid: str, plan: list[str]) -> list:
    """A rollout with tool calls: pinned system + user, then per letter of `plan` a turn: 't' = tool result of
    the previous call then an action that calls a tool, 'u' = a user message then such an action."""
    from schemas.arrow import encode_array
    from schemas.events import (RolloutEnded, RolloutEndedPayload, RolloutStarted, RolloutStartedPayload, Step,
                                StepPayload, ToolCall, new_event)

    evs = [new_event(RolloutStarted, rollout_id=rid, payload=RolloutStartedPayload(
        task_id="task-a", group_id="g", timeout_s=60.0))]
    steps = [dict(role="system", content="sys"), dict(role="user", content="task")]
    for k, kind in enumerate(plan):
        if kind == "t" and k:
            steps.append(dict(role="tool", content=f"out {k - 1}", tool_call_id=f"c{k - 1}"))
        else:
            steps.append(dict(role="user", content=f"note {k}"))
        steps.append(dict(role="assistant", content=f"act {k}", tool_call=ToolCall(name="bash", arguments="{}",
                                                                                  id=f"c{k}")))
    for i, st in enumerate(steps):
        evs.append(new_event(Step, rollout_id=rid, payload=StepPayload(
            step_idx=i, pinned=i < 2, token_ids=encode_array(np.arange(10, 40, dtype=np.int32), "int32"), **st)))
    evs.append(new_event(RolloutEnded, rollout_id=rid, payload=RolloutEndedPayload(status="finished",
                                                                                   n_steps=len(steps))))
    return evs


def test_messages_export_is_never_null(broker, tmp_path):
    """Every window's messages: its pinned prefix, then its steps from where its tokens start (a message
    boundary), tool calls structured. A window that starts with a tool result keeps it, answering a call in
    the window before (was: null, 55 of 61 rows of a real export)."""
    import uuid

    from consumers.materialize import build_version
    from consumers.sink import Sink
    from services.broker import ensure_topics
    from core.settings import Settings, Topics
    from tests.helpers import produce
    from tests.test_materialize import task

    settings = Settings(home=tmp_path / "home", bootstrap_servers=broker.bootstrap,
                        topics=Topics(f"t{uuid.uuid4().hex[:10]}"), partitions=1)
    settings.home.mkdir()
    ensure_topics(settings)
    plan = "ttututt"
    produce(settings, [task("task-a")] + _agent_rollout("ra", list(plan)))
    Sink(settings).run(until_idle=True, idle_s=0.3)
    build_version(settings.home, "agent", "sft", {"max_tokens": 200, "overlap_turns": 0})  # 60 prefix + 2 turns
    report = export_dataset(settings.home, "agent@1", "trl", tmp_path / "out", settings=settings)
    rows = _load(tmp_path / "out")
    assert len(rows) >= 3 and report.messages_left_out == 0
    starts_with_tool = 0
    for row in rows:
        msgs, body_first = row["messages"], row["first_step"]
        assert [m["role"] for m in msgs[:2]] == ["system", "user"] and msgs[2]["step_idx"] == body_first
        assert [m["step_idx"] for m in msgs] == [0, 1] + list(range(body_first, row["last_step"] + 1))
        assert all(m["loss"] == (m["role"] == "assistant" and m["step_idx"] >= 2) for m in msgs)
        k = (body_first - 2) // 2  # each turn is 2 steps after the 2 prefix steps
        assert msgs[2]["role"] == ("tool" if k > 0 and plan[k] == "t" else "user")
        if msgs[2]["role"] == "tool":
            starts_with_tool += 1
            assert msgs[2]["tool_call_id"] == f"c{k - 1}"  # the call of the window before
        assert msgs[3]["content"] == f"act {k}" and msgs[3]["tool_calls"][0]["id"] == f"c{k}"
        calls = {m["tool_calls"][0]["id"] for m in msgs if m["tool_calls"]}
        assert all(m["tool_call_id"] in calls for m in msgs[3:] if m["role"] == "tool")
    assert starts_with_tool > 0


@pytest.mark.parametrize("content, recorded, text, calls", [
    # what the importer writes: text, then each call rendered; the recorded call keeps its id and arguments
    ('Two.\n<tool_call>\n{"name": "bash", "arguments": {"cmd": "ls"}}\n</tool_call>\n<tool_call>\n'
     '{"name": "bash", "arguments": {"cmd": "pwd"}}\n</tool_call>', ("bash", '{"cmd":"ls"}', "c1"), "Two.",
     [("c1", "bash", '{"cmd":"ls"}'), ("call_5_1", "bash", '{"cmd": "pwd"}')]),
    # a call recorded only as structure: rendered from it, the text stays
    ("act 3", ("bash", "{}", "c3"), "act 3", [("c3", "bash", "{}")]),
    # no call; a block that is not JSON stays text
    ("<tool_call>\nnot json\n</tool_call>", None, "<tool_call>\nnot json\n</tool_call>", None),
])
def test_tool_calls_are_given_once(content, recorded, text, calls):
    from trainer.export_messages import split_tool_calls

    got_text, got = split_tool_calls(content, recorded, 5)
    assert got_text == text
    assert (None if got is None else [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in got]) == calls


def test_tool_results_and_calls_name_each_other():
    """A call recorded without an id takes the id its result names (the simulator's `call-2`); a result that
    names no call answers the call before it (was: `call_2` beside `call-2`, a result answering nothing)."""
    from trainer.export_messages import _link, split_tool_calls

    def step(i, role, content="", call=None, answers=None):
        text, calls = split_tool_calls(content, call, i) if role == "assistant" else (content, None)
        return {"role": role, "content": text, "tool_calls": calls, "tool_call_id": answers, "step_idx": i,
                "_named": bool(call and call[2])}

    by_idx = {2: step(2, "assistant", "look", ("bash", "{}", None)), 3: step(3, "tool", "out", answers="call-2"),
              4: step(4, "assistant", "again", ("bash", "{}", "c4")), 5: step(5, "tool", "out")}
    _link(by_idx)
    assert by_idx[2]["tool_calls"][0]["id"] == "call-2" and by_idx[5]["tool_call_id"] == "c4"
    assert all("_named" not in m for m in by_idx.values())
