"""A checked import row -> its rollout events, with deterministic ids and (optionally) token ids.

    >>> events = row_events(row, tokenizer, timeout_s=43200.0)   # rollout_started, steps, judge_result?, rollout_ended

Each message becomes one step whose content is the text followed by every tool call rendered as
`<tool_call>{json}</tool_call>` (`render`). With a model directory's tokenizer the row is rendered with
its chat template and split per message (`core.chat`); otherwise each step content is encoded alone;
ids the harness recorded win. Event ids are uuid5 of (rollout id, row hash, n), so the same row always
gives the same events (re-imports dedupe).
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Optional

from core.chat import ChatTokenizer, to_openai
from producers.import_rows import Message, Row
from schemas.arrow import encode_array
from schemas.events import (Envelope, JudgeResult, JudgeResultPayload, RolloutEnded, RolloutEndedPayload,
                            RolloutStarted, RolloutStartedPayload, Step, StepPayload, new_event)

_NS = uuid.UUID("6f1c2a52-3f0e-4c39-9b7e-4a3c1e0d9b21")  # namespace of imported event ids


def render(msg: Message) -> str:
    """The step content: the text, then each tool call as `<tool_call>{json}</tool_call>`."""
    parts = [msg.text] if msg.text else []
    for c in msg.calls:
        try:
            args: Any = json.loads(c.arguments) if c.arguments else {}
        except json.JSONDecodeError:
            args = c.arguments  # what the teacher wrote, even when it is not valid JSON
        parts.append("<tool_call>\n" + json.dumps({"name": c.name, "arguments": args}, ensure_ascii=False)
                     + "\n</tool_call>")
    return "\n".join(parts)


def n_events(row: Row) -> int:
    """rollout_started, one step per message, a judge_result if scored, rollout_ended."""
    return 2 + len(row.messages) + (row.score is not None)


def event_id(row: Row, n: int) -> str:
    """The id of a row's n-th event (0: rollout_started): the same row gives the same ids, every time."""
    return str(uuid.uuid5(_NS, f"{row.rollout_id}/{row.row_hash}/{n}"))


def chat_messages(row: Row) -> list[dict]:
    """The row's messages as the chat template takes them (tool calls structured, not in the content)."""
    return [to_openai(m.role, m.text, [(c.name, c.arguments, c.id) for c in m.calls], m.tool_call_id)
            for m in row.messages]


def row_token_ids(row: Row, tokenizer) -> list:
    """Token ids per message: a model directory's chat template split per message (`core.chat`: the
    ids concatenated are `apply_chat_template(messages, tools)`), else each step content encoded alone."""
    if isinstance(tokenizer, ChatTokenizer):
        return tokenizer.message_spans(chat_messages(row), row.tools)
    return tokenizer.encode_batch([render(m) for m in row.messages])


def token_plan(row: Row, tokenizer=None) -> tuple[str, str, Optional[str]]:
    """(how the row's steps get token ids, the fingerprint rollout_started records, a warning or None).

    `recorded`: every message has ids the harness recorded (ATIF), kept exactly under their own fingerprint
    (`row.token_source`), or the --tokenizer's when its chat template renders the very same ids. `render`:
    the --tokenizer renders the whole rollout (recorded ids, if any, are dropped: a rollout never mixes ids
    of two tokenizers). `text`: no ids; the dataset build tokenizes the whole rollout."""
    n, k = len(row.messages), sum(m.token_ids is not None for m in row.messages)
    fp = getattr(tokenizer, "fingerprint", "")
    if k == n:
        if isinstance(tokenizer, ChatTokenizer):
            spans = row_token_ids(row, tokenizer)
            if all(a.tolist() == list(m.token_ids) for a, m in zip(spans, row.messages)):
                return "recorded", fp, None
            return "render", fp, (f"its recorded token ids ({row.token_source}) are not what {tokenizer.path}'s chat "
                                  "template renders: the whole rollout is re-rendered with --tokenizer (the recorded "
                                  "ids and logprobs are not kept)")
        return "recorded", row.token_source, None
    if k and tokenizer is not None:
        if isinstance(tokenizer, ChatTokenizer):
            row_token_ids(row, tokenizer)  # a TemplateError here skips the row before anything is sent
        return "render", fp, (f"recorded token ids cover {k} of its {n} messages (the harness pruned or did not "
                              "record a context): the whole rollout is re-rendered with --tokenizer (the recorded "
                              "ids and logprobs are not kept)")
    if k:
        return "text", "", (f"recorded token ids cover {k} of its {n} messages: imported text-only, tokenized whole "
                            "when a dataset is built (pass --tokenizer MODEL_DIR to render it at import)")
    if isinstance(tokenizer, ChatTokenizer):
        row_token_ids(row, tokenizer)
    return ("render", fp, None) if tokenizer is not None else ("text", "", None)


def _sampled_counts(m, mode: str) -> dict:
    """The recorded sampled span of an assistant step, kept with the recorded ids it counts (never with
    re-rendered ones: those are the template's and `consumers.sampled` finds the markup itself)."""
    if mode != "recorded" or m.sampled is None:
        return {}
    return {"n_generation_prompt": m.sampled[0], "n_sampled": m.sampled[1]}


def row_events(row: Row, tokenizer=None, timeout_s: float = 43200.0) -> list[Envelope]:
    """The events of one row, in emission order, with deterministic event ids (token ids per `token_plan`)."""
    mode, fingerprint, _ = token_plan(row, tokenizer)
    n = 0

    def ev(cls, payload) -> Envelope:
        nonlocal n
        n += 1
        return new_event(cls, rollout_id=row.rollout_id, payload=payload, event_id=event_id(row, n - 1),
                         producer_id="klong-import")

    out = [ev(RolloutStarted, RolloutStartedPayload(task_id=row.task_id, group_id=row.group_id, timeout_s=timeout_s,
                                                    scaffold="import", model=row.model,
                                                    tokenizer=fingerprint, tools=list(row.tools) or None))]
    contents = [render(m) for m in row.messages]
    if mode == "recorded":  # token-in/token-out: the harness's ids, as they are
        ids = [m.token_ids for m in row.messages]
    else:
        ids = row_token_ids(row, tokenizer) if mode == "render" else [None] * len(contents)
    for i, (m, text, tok) in enumerate(zip(row.messages, contents, ids)):
        lps = m.logprobs if mode == "recorded" else None
        out.append(ev(Step, StepPayload(
            step_idx=i, role=m.role, content=text, tool_call=m.calls[0] if m.calls else None,
            tool_call_id=m.tool_call_id, pinned=i < row.prefix,
            token_ids=None if tok is None else encode_array(tok, "int32"),
            logprobs=None if lps is None else encode_array(lps, "float32"),
            **_sampled_counts(m, mode))))
    last = len(row.messages) - 1
    if row.score is not None:
        out.append(ev(JudgeResult, JudgeResultPayload(request_id=f"{row.rollout_id}-import", step_idx=last,
                                                      task_id=row.task_id, judge_model="import", score=row.score,
                                                      valid=True)))
    out.append(ev(RolloutEnded, RolloutEndedPayload(status="finished", n_steps=len(row.messages))))
    return out
