"""Checking teacher trajectory rows: one JSON value -> a `Row` of parsed chat messages, or a `RowError`.

    >>> row = parse_row({"task_id": "fre", "messages": [...], "score": 0.8}, 1, ImportOptions(), seen={})
    >>> for line, row, reason in read_rows(path, ImportOptions()): ...   # reason: why a bad row is skipped

`parse_messages` checks every OpenAI chat message (role, text content parts, tool calls and the tool
messages answering them, recorded token ids / logprobs) and `parse_row` the row fields (task_id,
score, id, group, pinned prefix via `producers.paper_prefix`, tools). The rollout id is derived from the
row's `id` (and task), else from the canonical content hash and how many identical rows came before, so
re-importing a file gives the same ids. Nothing here sends anything (`producers.importer` does).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from producers.import_formats import read_objects
from producers.paper_prefix import prefix_length
from schemas.claimcheck import MAX_EVENT_BYTES
from schemas.errors import ConfigError, ValidationError
from schemas.events import ToolCall

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
ID_PREFIX = "imp-"
MAX_ARGS_CHARS = MAX_EVENT_BYTES // 4  # tool call arguments stay in the step event (<= 4 bytes a char as JSON)


class RowError(ValidationError):
    """One row is malformed; the message says what (the caller adds the line number)."""


@dataclass(frozen=True)
class ImportOptions:
    tokenizer: Optional[str] = None  # None: text-only steps (tokenized when a dataset is built)
    prefix_steps: Optional[int] = None  # pin the first N steps of every row (a row's pinned_steps wins)
    paper_rule: bool = True  # False: the prefix is the system messages + the first user message
    group_field: Optional[str] = None  # row field holding the group id (default: group_id, else task_id)
    timeout_s: float = 43200.0  # rollout_started.timeout_s of imported rollouts (12 h, the paper's budget)
    strict: bool = False  # any bad row: import nothing
    dry_run: bool = False
    format: str = "auto"  # openai | atif | mini-swe | auto: detected per trajectory (producers.import_formats)
    task_id: Optional[str] = None  # the task of ATIF / mini-SWE-agent trajectories (they do not name one)

    def __post_init__(self) -> None:
        if self.prefix_steps is not None and self.prefix_steps < 0:
            raise ConfigError(f"--prefix-steps must be >= 0, got {self.prefix_steps}")
        if not self.timeout_s > 0:
            raise ConfigError(f"--timeout-s must be > 0, got {self.timeout_s}")


@dataclass(frozen=True)
class Message:
    role: str
    text: str  # the message text (content parts joined)
    calls: tuple[ToolCall, ...] = ()
    tool_call_id: Optional[str] = None
    token_ids: Optional[tuple[int, ...]] = None  # recorded by the harness (ATIF): used as they are
    logprobs: Optional[tuple[float, ...]] = None  # assistant steps: one per recorded token id
    # assistant steps with recorded ids: which of them the policy sampled (`token_ids[g:g + n]`, the rest is
    # template markup: `n_generation_prompt` ids before, closing ids after); None: not recorded
    sampled: Optional[tuple[int, int]] = None


@dataclass(frozen=True)
class Row:
    line: int
    rollout_id: str
    row_hash: str
    task_id: str
    group_id: str
    messages: tuple[Message, ...]
    prefix: int  # steps [0, prefix) are pinned
    score: Optional[float]
    model: str = ""
    tools: tuple = ()  # the row's OpenAI `tools` (function schemas): rendered into the system message
    token_source: str = ""  # whose tokenizer the recorded token_ids come from ("atif:AGENT/MODEL"; "" none recorded)
    warnings: tuple[str, ...] = ()  # what the import changed or guessed in this row (printed, never silent)



def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: only text parts can be recorded
        out = []
        for k, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text")
                    and isinstance(part.get("text"), str)):
                raise RowError(f"{where}: content part {k} is not a text part ({{'type': 'text', 'text': ...}})")
            out.append(part["text"])
        return "".join(out)
    raise RowError(f"{where}: content must be a string or a list of text parts, got {type(content).__name__}")


def _calls(msg: dict, where: str) -> tuple[ToolCall, ...]:
    raw = msg.get("tool_calls")
    if raw is None and isinstance(msg.get("function_call"), dict):  # legacy single function call
        raw = [{"type": "function", "function": msg["function_call"]}]
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise RowError(f"{where}: tool_calls must be a list, got {type(raw).__name__}")
    calls = []
    for k, c in enumerate(raw):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RowError(f"{where}: tool_calls[{k}] needs function.name (a non-empty string)")
        if c.get("type", "function") != "function":
            raise RowError(f"{where}: tool_calls[{k}] has type {c.get('type')!r}; only 'function' calls are recorded")
        args = fn.get("arguments", "")
        if not isinstance(args, str):  # some sets store the arguments object itself
            if not isinstance(args, (dict, list)):
                raise RowError(f"{where}: tool_calls[{k}].function.arguments must be JSON text or an object")
            args = json.dumps(args, ensure_ascii=False)
        if len(args) > MAX_ARGS_CHARS:  # the claim check moves content, not a tool call: the event could not be sent
            raise RowError(f"{where}: tool_calls[{k}] arguments are {len(args)} characters (limit {MAX_ARGS_CHARS})")
        call_id = c.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise RowError(f"{where}: tool_calls[{k}].id must be a string, got {type(call_id).__name__}")
        calls.append(ToolCall(name=fn["name"], arguments=args, id=call_id))
    return tuple(calls)


def _recorded(msg: dict, role: str, where: str) -> tuple[Optional[tuple], Optional[tuple]]:
    """A message's recorded `token_ids` / `logprobs` (ATIF carries them; `producers.import_formats`)."""
    ids, lps = msg.get("token_ids"), msg.get("logprobs")
    if ids is not None and not (isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                                              and 0 <= t < 2**31 for t in ids)):
        raise RowError(f"{where}: token_ids must be a list of token ids (int32 >= 0)")
    if lps is not None:
        if role != "assistant" or ids is None or not isinstance(lps, list) or len(lps) != len(ids) or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in lps):
            raise RowError(f"{where}: logprobs must be numbers, one per token id, on an assistant message")
    return (None if ids is None else tuple(ids)), (None if lps is None else tuple(float(x) for x in lps))


def _sampled(msg: dict, role: str, ids: Optional[tuple], where: str) -> Optional[tuple[int, int]]:
    """A message's recorded `n_generation_prompt` / `n_sampled` (which of its token_ids were sampled)."""
    g, n = msg.get("n_generation_prompt"), msg.get("n_sampled")
    if g is None and n is None:
        return None
    ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
    if role != "assistant" or ids is None or not ok(g) or not ok(n) or g + n > len(ids):
        raise RowError(f"{where}: n_generation_prompt and n_sampled go together, on an assistant message with "
                       f"token_ids, as counts whose sum is at most its {0 if ids is None else len(ids)} ids")
    return g, n


def parse_messages(messages: Any, warnings: Optional[list] = None) -> tuple[Message, ...]:
    """Checked messages. `warnings` (a list) collects what was guessed: a tool message that names no call
    is linked to the one open call of the assistant message before it (with several, it is an error)."""
    warnings = [] if warnings is None else warnings
    if not isinstance(messages, list) or not messages:
        raise RowError("`messages` must be a non-empty list of chat messages")
    out: list[Message] = []
    open_calls: Optional[tuple[ToolCall, ...]] = None  # calls of the last assistant message, if tools follow
    answered: set = set()  # ids of those calls that a tool message answered
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RowError(f"message {i}: must be an object with `role` and `content`, got {type(m).__name__}")
        role = ROLES.get(m.get("role")) if isinstance(m.get("role"), str) else None
        if role is None:
            raise RowError(f"message {i}: unknown role {m.get('role')!r} (known: {', '.join(ROLES)})")
        where = f"message {i} ({m['role']})"
        content = m.get("content")
        calls = _calls(m, where) if role == "assistant" else ()
        if role != "assistant" and (m.get("tool_calls") or m.get("function_call")):
            raise RowError(f"{where}: only assistant messages make tool calls")
        if content is None and not (role == "assistant" and calls):
            raise RowError(f"{where}: content is missing (null is allowed only on assistant messages with tool_calls)")
        text = "" if content is None else _text(content, where)
        call_id = m.get("tool_call_id")
        if role == "tool":
            if not open_calls:
                raise RowError(f"{where}: a tool message must follow an assistant message with tool_calls")
            if call_id is not None and not isinstance(call_id, str):
                raise RowError(f"{where}: tool_call_id must be a string, got {type(call_id).__name__}")
            known = {c.id for c in open_calls if c.id}
            if call_id is not None and known and call_id not in known:
                raise RowError(f"{where}: tool_call_id {call_id!r} answers no tool call of the assistant "
                               f"message before it (ids: {', '.join(sorted(known))})")
            if call_id is None and known:
                unanswered = sorted(known - answered)
                if len(unanswered) != 1:
                    raise RowError(f"{where}: names no tool call (tool_call_id) and the assistant message before it "
                                   f"made {len(unanswered)} unanswered calls ({', '.join(unanswered)}): which one "
                                   "it answers is unknown")
                call_id = unanswered[0]
                warnings.append(f"{where} names no tool call (tool_call_id): linked to the only open call "
                                f"{call_id!r}")
            if call_id is not None:
                answered.add(call_id)
        elif role == "assistant":
            open_calls, answered = calls, set()
        else:
            open_calls = None
        ids, lps = _recorded(m, role, where)
        out.append(Message(role, text, calls, call_id if role == "tool" else None, ids, lps,
                           _sampled(m, role, ids, where)))
    if not any(m.role == "assistant" for m in out):
        raise RowError("no assistant message: nothing to learn from")
    return tuple(out)


def _canonical_hash(row: dict) -> str:
    """sha256 of the row as canonical JSON: the same row hashes the same however the file spaces it."""
    canon = json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode()).hexdigest()


def parse_row(obj: Any, line: int, opts: ImportOptions, seen: dict[str, int]) -> Row:
    """One decoded JSONL value -> Row (RowError names what is wrong). `seen` counts row hashes and ids so
    far (identical rows stay distinct rollouts; a repeated `id` is an error)."""
    if not isinstance(obj, dict):
        raise RowError(f"a row must be a JSON object, got {type(obj).__name__}")
    try:
        row_hash = _canonical_hash(obj)
    except UnicodeEncodeError as e:  # JSON allows "\ud800", but no event (UTF-8) can carry it
        raise RowError(f"a string holds an unpaired surrogate escape ({e.reason}): not valid text") from None
    task_id = obj.get("task_id")
    if not isinstance(task_id, str) or not task_id.strip() or len(task_id) > 256:
        raise RowError(f"`task_id` must be a non-empty string (<= 256 chars), got {task_id!r}")
    noted = obj.get("_warnings")  # what a format's conversion noted (producers.import_atif)
    warnings: list[str] = [w for w in noted if isinstance(w, str)] if isinstance(noted, list) else []
    messages = parse_messages(obj.get("messages"), warnings)
    score = obj.get("score")
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))
                              or not math.isfinite(score) or not 0 <= score <= 1):
        raise RowError(f"`score` must be a number in [0, 1] (or absent), got {score!r}")
    row_id = obj.get("id")
    if row_id is not None and (isinstance(row_id, bool) or not isinstance(row_id, (str, int)) or row_id == ""):
        raise RowError(f"`id` must be a non-empty string or an integer, got {row_id!r}")
    parent = obj.get("parent_id")  # a sub-trajectory: its group is its parent's rollout (the link in SQL)
    default_group = _rollout_id(f"id:{task_id}\0{parent}") if parent is not None else task_id
    group = obj.get(opts.group_field) if opts.group_field else obj.get("group_id", default_group)
    if isinstance(group, int) and not isinstance(group, bool):
        group = str(group)
    if not isinstance(group, str) or not group or len(group) > 256:
        what = f"field {opts.group_field!r} (--group-field)" if opts.group_field else "`group_id`"
        raise RowError(f"{what} must be a non-empty string or an integer, got {group!r}")
    pins = obj.get("pinned_steps", opts.prefix_steps)
    if pins is not None and (isinstance(pins, bool) or not isinstance(pins, int) or not 0 <= pins <= len(messages)):
        src = "`pinned_steps`" if "pinned_steps" in obj else "--prefix-steps"
        raise RowError(f"{src} must be an integer in [0, {len(messages)}] (the row's message count), got {pins!r}")
    prefix = pins if pins is not None else prefix_length([(m.role, m.calls) for m in messages], opts.paper_rule)
    if row_id is not None:
        key = f"id:{task_id}\0{row_id}"
        if key in seen:
            raise RowError(f"`id` {row_id!r} is already used by line {seen[key]} for task {task_id!r}")
        seen[key] = line
    else:
        n = seen.get(row_hash, 0)  # the n-th identical row of the file is its own rollout
        seen[row_hash] = n + 1
        key = f"hash:{row_hash}#{n}"
    rollout_id = _rollout_id(key)
    model = obj.get("model") if isinstance(obj.get("model"), str) else ""
    tools = obj.get("tools") or []
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RowError("`tools` must be a list of OpenAI tool objects ({\"type\": \"function\", \"function\": "
                       "{\"name\", \"parameters\", ...}})")
    source = obj.get("token_source")
    if source is not None and not isinstance(source, str):
        raise RowError(f"`token_source` must be a string naming the tokenizer of the recorded token_ids, got {source!r}")
    if source is None and any(m.token_ids is not None for m in messages):
        source = f"recorded:{model[:200] or 'unknown'}"
    return Row(line, rollout_id, row_hash, task_id, group, messages, prefix, None if score is None else float(score),
               model[:256], tuple(tools), (source or "")[:300], tuple(warnings))


def _rollout_id(key: str) -> str:
    return ID_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:32]


def read_rows(path: Path, opts: ImportOptions) -> Iterator[tuple[int, Optional[Row], Optional[str]]]:
    """(line, Row, None) or (line, None, reason) for every trajectory of the file: JSONL rows, or ATIF /
    mini-SWE-agent trajectories converted to rows (`producers.import_formats`, by `opts.format`)."""
    seen: dict[str, int] = {}
    for line, obj, reason in read_objects(path, opts.format, opts.task_id):
        if reason is not None:
            yield line, None, reason
            continue
        try:
            yield line, parse_row(obj, line, opts, seen), None
        except RowError as e:
            yield line, None, str(e)
