"""Windows are exactly what the real model sees: SmolLM2's directory template, per-message spans, imports.

Invariants (issue 10, on the real SmolLM2 tokenizer and tool-aware template): (b) an imported trajectory that
fits one window has the window input == apply_chat_template(messages, tools), tool calls included; (c) the
loss mask covers exactly what the assistant produced (not the template's generation prompt and closing ids). Plus: the builder renders text-only rollouts with the model
directory's template, and refuses to mix tokenizers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from core.chat import ChatTokenizer, TemplateError
from consumers.materialize import build_version
from producers.importer import parse_messages, render
from tests.test_import import cli, paperbench_row, produce, sink, task_event
from trainer.data import DatasetReader

TOOLS_ROW_TOOLS = [{"type": "function", "function": {
    "name": name, "description": f"the {name} tool", "parameters": {"type": "object", "properties": props}}}
    for name, props in [("bash", {"cmd": {"type": "string"}}),
                        ("read_file_chunk", {"file": {"type": "string"}, "start_line": {"type": "integer"}})]]


@pytest.fixture(scope="module")
def chat(smollm2_dir):
    return ChatTokenizer(smollm2_dir)


def _reference(chat: ChatTokenizer, messages, tools=None) -> np.ndarray:
    out = chat.tok.apply_chat_template(messages, tools=tools)
    return np.asarray(out["input_ids"] if hasattr(out, "keys") else out, dtype=np.int32)


def _assistant_texts(messages) -> list[str]:
    """Each assistant turn in its markup (header, text, tool calls, end of turn), spelled out by hand."""
    out = []
    for m in messages:
        if m["role"] != "assistant":
            continue
        parts = [m["content"]] if m.get("content") else []
        parts += ['<tool_call>\n{"name": "%s", "arguments": %s}\n</tool_call>' % (c["function"]["name"],
                                                                                c["function"]["arguments"])
                  for c in m.get("tool_calls") or []]
        out.append("<|im_start|>assistant\n" + "\n".join(parts) + "<|im_end|>\n")
    return out


def _sampled_texts(messages) -> list[str]:
    """What the assistant produced in each turn: its text and tool calls and the end-of-turn id it stopped with.
    The generation prompt before it and the template's `\\n` after it are context, not output: no loss."""
    return [t[len("<|im_start|>assistant\n"):-len("\n")] for t in _assistant_texts(messages)]


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def test_message_spans_concatenate_to_apply_chat_template(chat):
    row = paperbench_row(chunks=1, work=2)
    spans = chat.message_spans(row["messages"], TOOLS_ROW_TOOLS)
    assert len(spans) == len(row["messages"])
    assert np.array_equal(np.concatenate(spans), _reference(chat, row["messages"], TOOLS_ROW_TOOLS))
    asst = [chat.decode(s) for s, m in zip(spans, row["messages"]) if m["role"] == "assistant"]
    assert asst == _assistant_texts(row["messages"])
    # what a new message adds to a live context: the same ids as its span
    added = chat.added_ids(row["messages"][:3], [row["messages"][3]], TOOLS_ROW_TOOLS)
    assert np.array_equal(added, spans[3]) and chat.decode(added).startswith("<|im_start|>tool\n")
    header = chat.generation_prompt(row["messages"][:4], TOOLS_ROW_TOOLS)
    assert chat.decode(header) == "<|im_start|>assistant\n" and np.array_equal(header, spans[4][:len(header)])


def test_a_template_that_rewrites_earlier_messages_is_refused(smollm2_dir, tmp_path):
    import shutil

    d = tmp_path / "m"
    d.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / f, d / f)
    # numbers every message by how many follow it: appending a message changes every earlier rendering
    (d / "chat_template.jinja").write_text("{% for m in messages %}<|im_start|>{{ m['role'] }} "
                                           "{{ messages|length - loop.index }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    with pytest.raises(TemplateError, match="not append-only"):
        ChatTokenizer(d).message_spans([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


def test_imported_window_is_apply_chat_template_and_the_loss_is_on_assistant_tokens(make_settings, tmp_path,
                                                                                     smollm2_dir, chat):
    settings = make_settings()
    produce(settings, [task_event("fre")])
    row = paperbench_row(chunks=2, work=2, id="t-1", tools=TOOLS_ROW_TOOLS)
    (tmp_path / "t.jsonl").write_text(json.dumps(row) + "\n")
    (settings.home / "models").mkdir()
    (settings.home / "models" / "smollm2").symlink_to(smollm2_dir)  # --tokenizer NAME: HOME/models/NAME
    assert cli(settings, "import", "trajectories", str(tmp_path / "t.jsonl"), "--tokenizer", "smollm2") == 0
    sink(settings)
    # prefix_loss=always: every assistant message (the paper reading in the prefix too) carries loss
    out = build_version(settings.home, "teacher", "sft", {"max_tokens": 8192, "tokenizer": str(smollm2_dir),
                                                          "prefix_loss": "always"})
    assert out.manifest["counts"]["token_ids_from"] == chat.fingerprint
    reader = DatasetReader(settings.home, out.ref)
    assert len(reader) == 1
    ids, mask = reader.sample(0)
    assert np.array_equal(ids, _reference(chat, row["messages"], TOOLS_ROW_TOOLS))  # (b)
    # (c) the loss covers what the assistant produced, not the template's header `<|im_start|>assistant\n` nor
    # the `\n` it closes the turn with: an import with ids and no n_sampled, masked by the template's markup
    assert [chat.decode(ids[a:b]) for a, b in _runs(mask)] == _sampled_texts(row["messages"])
    assert "<tools>" in chat.decode(ids[:np.flatnonzero(mask)[0]])

    # the same rows text-only, rendered by the builder with the model directory's template (no tools there)
    other = make_settings("text-only")
    produce(other, [task_event("fre")])
    plain = {**{k: v for k, v in row.items() if k != "tools"}, "id": "t-2"}
    (tmp_path / "p.jsonl").write_text(json.dumps(plain) + "\n")
    assert cli(other, "import", "trajectories", str(tmp_path / "p.jsonl")) == 0
    sink(other)
    built = build_version(other.home, "teacher", "sft", {"max_tokens": 8192, "tokenizer": str(smollm2_dir),
                                                         "prefix_loss": "always"})
    (other.home / "models").mkdir()
    (other.home / "models" / "smollm2").symlink_to(smollm2_dir)  # tokenizer=NAME: HOME/models/NAME, the same build
    again = build_version(other.home, "teacher", "sft", {"max_tokens": 8192, "tokenizer": "smollm2",
                                                         "prefix_loss": "always"})
    assert again.existing and again.ref == built.ref
    ids, mask = DatasetReader(other.home, built.ref).sample(0)
    contents = [render(m) for m in parse_messages(plain["messages"])]  # the importer's step contents
    steps = [{"role": m["role"], "content": c} for m, c in zip(plain["messages"], contents)]
    assert np.array_equal(ids, _reference(chat, steps))
    assert [chat.decode(ids[a:b]) for a, b in _runs(mask)] == [f"{c}<|im_end|>" for m, c in
                                                                zip(plain["messages"], contents) if m["role"] == "assistant"]
    assert out.manifest["counts"]["assistant_markup_tokens"] == built.manifest["counts"]["assistant_markup_tokens"] > 0

    # ids of the model's tokenizer never share a dataset with byte-tokenized text-only steps
    assert cli(settings, "import", "trajectories", str(tmp_path / "p.jsonl")) == 0  # same row, other id: text-only
    sink(settings)
    with pytest.raises(Exception, match="mix token ids of different tokenizers"):
        build_version(settings.home, "mixed", "sft", {"max_tokens": 8192})

