"""The `messages` column of a dataset export: each window as OpenAI-style chat messages, where that is lossless.

    klong dataset export web-sft@3 --format trl --messages -o out/

A window's messages are its rollout's pinned prefix steps, then the steps its spans use, in order, read
from the archive (`step_events`; of two events for one step the first by produced_at, as the builder
keeps). Each message: `role`, `content`, `tool_calls` (OpenAI shape, or null), `tool_call_id`, and three
fields of ours: `step_idx`, `loss` (the step's tokens carry loss in this window) and `truncated` (an
observation of which the window keeps only the last tokens: its full text is given, marked).

Lossless means valid chat that says what the tokens say. A window starts with whole turns, but a turn
starts with its observations: when the first one is a tool result whose call (the previous assistant
step) lies outside the window, the messages would not be valid chat, so that sample's `messages` is
null (counted in the export manifest as `messages_left_out`). Windows whose turns begin after a user
message, or whose first tool result answers a call inside the window, keep their messages.
"""

from __future__ import annotations

from collections import defaultdict
import pyarrow as pa
import pyarrow.parquet as pq

from store import datasets as ds

TOOL_CALL = pa.struct([("id", pa.string()), ("type", pa.string()),
                       ("function", pa.struct([("name", pa.string()), ("arguments", pa.string())]))])
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string()), ("tool_calls", pa.list_(TOOL_CALL)),
                     ("tool_call_id", pa.string()), ("step_idx", pa.int32()), ("loss", pa.bool_()),
                     ("truncated", pa.bool_())])
MESSAGES = pa.list_(MESSAGE)


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
        calls = [{"id": call_id or f"call_{idx}", "type": "function", "function": {"name": name, "arguments": args}}] \
            if name is not None else None
        out[rid][idx] = {"role": role, "content": content, "tool_calls": calls,
                         "tool_call_id": (answers or None) if role == "tool" else None, "step_idx": idx}
    return out


def _valid_chat(messages: list[dict]) -> bool:
    """Every tool message follows (through other tool messages) an assistant message with a tool call."""
    last = None
    for m in messages:
        if m["role"] == "tool":
            if last is None or last["role"] != "assistant" or not last["tool_calls"]:
                return False
        else:
            last = m
    return True


def messages_column(settings, version_path) -> tuple[pa.Array, int]:
    """(the messages of every sample in samples.parquet order, null where left out; how many were left out)."""
    tokens = pq.read_table(version_path / ds.TOKENS, columns=["rollout_id", "prefix_len"])
    prefix = dict(zip(tokens.column("rollout_id").to_pylist(), tokens.column("prefix_len").to_pylist()))
    s = pq.read_table(version_path / ds.SAMPLES, columns=["rollout_id", "prefix_loss", "span_step", "span_start",
                                                          "span_loss"])
    steps = _steps(settings, sorted(prefix))
    out, left_out = [], 0
    for rid, pl, sp_step, sp_start, sp_loss in zip(*(s.column(c).to_pylist() for c in s.column_names)):
        by_idx = steps.get(rid, {})
        msgs = [dict(by_idx[i], loss=pl and by_idx[i]["role"] == "assistant", truncated=False)
                for i in range(prefix[rid]) if i in by_idx]
        body: dict[int, dict] = {}
        for st, lo, loss in zip(sp_step, sp_start, sp_loss):
            m = body.setdefault(st, dict(by_idx[st], loss=False, truncated=False)) if st in by_idx else None
            if m is not None:
                m["loss"] |= bool(loss)
                m["truncated"] |= lo > 0 and m["role"] != "assistant"
        msgs += [body[k] for k in sorted(body)]
        complete = len(msgs) == prefix[rid] + len(set(sp_step))
        if complete and _valid_chat(msgs):
            out.append(msgs)
        else:
            out.append(None)
            left_out += 1
    return pa.array(out, MESSAGES), left_out

