"""The chat columns of a dataset export: each window as OpenAI-style chat messages, and (verl) its RL prompt.

    klong dataset export web-sft@3 --format trl --messages -o out/     # + `messages`
    klong dataset export web-sft@3 --format verl -o out/               # + messages, prompt, reward_model, ...

A window's messages are its rollout's pinned prefix steps, then the steps its spans use, in order, read
from the archive (`step_events`; of two events for one step the first by produced_at, as the builder
keeps). So they start where the window's tokens start, at a message boundary, and are never null. Each
message: `role`, `content`, `tool_calls` (OpenAI shape, or null), `tool_call_id`, and three fields of ours:
`step_idx`, `loss` (the step's tokens carry loss in this window) and `truncated` (an observation of which
the window keeps only the last tokens: its full text is given, marked).

Tool calls are given once: a step's content holds each call as the chat template renders it
(`<tool_call>{"name": ..., "arguments": ...}</tool_call>`, how recorders and importers store them), so
those blocks move out of `content` into `tool_calls` (the step's recorded call keeps its id and its
arguments text), and a chat template renders them back where they were. A window that starts with a tool
result keeps it as a `tool` message whose `tool_call_id` names a call in an earlier window: the messages
say exactly what the tokens say (a chat template renders it; an OpenAI endpoint would not accept it).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.errors import ConfigError
from store import datasets as ds

TOOL_CALL = pa.struct([("id", pa.string()), ("type", pa.string()),
                       ("function", pa.struct([("name", pa.string()), ("arguments", pa.string())]))])
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string()), ("tool_calls", pa.list_(TOOL_CALL)),
                     ("tool_call_id", pa.string()), ("step_idx", pa.int32()), ("loss", pa.bool_()),
                     ("truncated", pa.bool_())])
MESSAGES = pa.list_(MESSAGE)
# A rendered call: what the template (and `producers.import_events.render`) writes after the message text.
_CALL = re.compile(r"\n?<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)


def split_tool_calls(content: str, recorded: Optional[tuple], step_idx: int) -> tuple[str, Optional[list]]:
    """(text without the rendered calls, the calls in OpenAI shape or None). `recorded` = (name, arguments,
    id) of the step's structured call: the first rendered call of that name takes its id and arguments text."""
    calls, kept, pos = [], [], 0
    for m in _CALL.finditer(content or ""):
        try:
            call = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue  # not a call the template wrote: it stays text
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            continue
        args = call.get("arguments", {})
        kept.append(content[pos:m.start()])
        pos = m.end()
        calls.append({"id": f"call_{step_idx}_{len(calls)}", "type": "function",
                      "function": {"name": call["name"],
                                   "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}})
    text = "".join(kept) + (content or "")[pos:]
    if recorded is not None:
        name, args, cid = recorded
        match = next((c for c in calls if c["function"]["name"] == name), None)
        if match is None:  # a call recorded only as structure (not in the text): rendered from it
            calls.insert(0, match := {"id": None, "type": "function", "function": {"name": name, "arguments": args}})
        match["id"] = cid or f"call_{step_idx}"
        if args:
            match["function"]["arguments"] = args
    return text, (calls or None)


def _steps(settings, rollout_ids: list[str]) -> dict[str, dict[int, dict]]:
    """rollout_id -> step_idx -> message fields, from the archive (first event per step)."""
    from store.catalog import Catalog

    con = Catalog(settings).connect("step_events")
    try:
        con.register("_export_rollouts", pa.table({"rollout_id": rollout_ids}))
        rows = con.execute("""
            SELECT rollout_id, step_idx, role, content, tool_call.name, tool_call.arguments, tool_call.id, tool_call_id
            FROM step_events JOIN _export_rollouts USING (rollout_id)
            QUALIFY row_number() OVER (PARTITION BY rollout_id, step_idx ORDER BY produced_at, kafka_offset) = 1
        """).fetchall()
    finally:
        con.close()
    out: dict[str, dict[int, dict]] = defaultdict(dict)
    for rid, idx, role, content, name, args, call_id, answers in rows:
        text, calls = content or "", None
        if role == "assistant":
            text, calls = split_tool_calls(text, (name, args or "", call_id) if name is not None else None, idx)
        out[rid][idx] = {"role": role, "content": text, "tool_calls": calls,
                         "tool_call_id": (answers or None) if role == "tool" else None, "step_idx": idx,
                         "_named": call_id is not None}
    for by_idx in out.values():
        _link(by_idx)
    return out


def _link(by_idx: dict[int, dict]) -> None:
    """Tool results and their calls name each other: a call the recorder gave no id takes the id its result
    names, and a result that names no call gets the next unanswered call's id (the step order says which)."""
    calls: list = []
    for i in sorted(by_idx):
        m = by_idx[i]
        if m["role"] == "assistant":
            calls = list(m["tool_calls"] or [])
            if calls and not m["_named"] and i + 1 in by_idx and by_idx[i + 1]["role"] == "tool" \
                    and by_idx[i + 1]["tool_call_id"]:
                calls[0]["id"] = by_idx[i + 1]["tool_call_id"]
        elif m["role"] == "tool" and calls:
            if m["tool_call_id"] is None:
                m["tool_call_id"] = calls[0]["id"]
            calls = [c for c in calls if c["id"] != m["tool_call_id"]] or calls[-1:]
        elif m["role"] != "tool":
            calls = []
    for m in by_idx.values():
        del m["_named"]


def window_messages(settings, version_path) -> tuple[list[list[dict]], list[int]]:
    """(the messages of every sample in samples.parquet order, how many of each are the pinned prefix); a
    ConfigError when the archive lacks a step."""
    tokens = pq.read_table(version_path / ds.TOKENS, columns=["rollout_id", "prefix_len"])
    prefix = dict(zip(tokens.column("rollout_id").to_pylist(), tokens.column("prefix_len").to_pylist()))
    s = pq.read_table(version_path / ds.SAMPLES, columns=["rollout_id", "prefix_loss", "span_step", "span_start",
                                                          "span_loss"])
    steps = _steps(settings, sorted(prefix))
    from trainer.export_tools import system_with_tools

    manifest = json.loads((version_path / ds.MANIFEST).read_text())
    systems = system_with_tools(settings.home, version_path, manifest,
                                {r: by[0]["content"] for r, by in steps.items() if 0 in by and by[0]["role"] == "system"})
    for rid, text in systems.items():
        steps[rid][0]["content"] = text
    out, n_prefix = [], []
    for rid, pl, sp_step, sp_start, sp_loss in zip(*(s.column(c).to_pylist() for c in s.column_names)):
        by_idx = steps.get(rid, {})
        missing = sorted(set(range(prefix[rid])).union(sp_step) - set(by_idx))
        if missing:
            raise ConfigError(f"rollout {rid}: steps {missing[:5]} are not in the archive of {settings.home} "
                              "(export from the home the dataset was built in)")
        msgs = [dict(by_idx[i], loss=bool(pl) and by_idx[i]["role"] == "assistant", truncated=False)
                for i in range(prefix[rid])]
        body: dict[int, dict] = {}
        for st, lo, loss in zip(sp_step, sp_start, sp_loss):
            m = body.setdefault(st, dict(by_idx[st], loss=False, truncated=False))
            m["loss"] |= bool(loss)
            m["truncated"] |= lo > 0 and m["role"] != "assistant"
        out.append(msgs + [body[k] for k in sorted(body)])
        n_prefix.append(prefix[rid])
    return out, n_prefix


def messages_column(settings, version_path) -> tuple[pa.Array, int]:
    """(the messages of every sample in samples.parquet order; 0: none is left out, kept for callers)."""
    return pa.array(window_messages(settings, version_path)[0], MESSAGES), 0


def prompt_of(messages: list[dict], prefix_len: int) -> list[dict]:
    """The window's prompt for an RL trainer that samples its own actions: every message before the first
    assistant message after the pinned prefix (the prefix, then the observations the first action answers)."""
    for k in range(prefix_len, len(messages)):
        if messages[k]["role"] == "assistant":
            return messages[:k]
    return list(messages)
