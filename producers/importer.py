"""Teacher trajectories (OpenAI chat-messages JSONL) -> rollout events, all or nothing per row.

    klong import trajectories teacher.jsonl [--tokenizer MODEL_DIR] [--prefix-steps N] [--no-paper-rule]
    >>> report = import_trajectories(settings, "teacher.jsonl", ImportOptions())   # -> ImportReport

One row per line: `{"task_id": "fre", "messages": [...], "score": 0.8, "id": "traj-17", "group_id": ...}`.
`messages` are OpenAI chat messages (`role` system | developer | user | assistant | tool, `content` a
string or a list of text parts, `tool_calls` / legacy `function_call` on assistant messages,
`tool_call_id` on tool messages), the shape of public agent-trajectory sets. Each row becomes one
finished rollout: `rollout_started`, one `step` per message, a `judge_result` (judge_model "import")
when the row has a `score` in [0, 1], and `rollout_ended` last (so a crash mid-row leaves a rollout
the dataset builder lists as pending, never trains on, and the next run of the import completes).

Assistant steps: the first tool call is the step's structured `tool_call`; the step content is the
message text followed by every tool call rendered as `<tool_call>{"name": ..., "arguments": ...}
</tool_call>`, because the content is what gets tokenized for training (a tool call left out of the
content would teach nothing) and because a message may make several calls while a step holds one.

Token ids at import (`tokenizer`): a model directory (`klong model import`) renders the row's messages
and its `tools` with the model's chat template and records each message's span of that rendering
(`consumers.chat`): the step ids concatenated are `apply_chat_template(messages, tools)`, tool calls and
role markup included, and each assistant step holds what the model writes after `<|im_start|>assistant\n`.
"bytes" or a bare tokenizer.json encode each step content alone (tests). rollout_started records the
tokenizer's fingerprint.

The pinned prefix (steps `[0, P)`): leading system messages, the first user message, then each leading
assistant message whose every tool call reads the task's paper files, with its tool outputs, up to the
first step that is not paper reading (`producers.paper_prefix`). Overrides: a row field `pinned_steps`,
`prefix_steps=N` for every row, or `paper_rule=False` (system + first user only).

Validation first (every row, nothing sent), then emission of the good rows; bad rows are reported
with their line number and skipped. Ids are deterministic: a row's rollout id comes from its `id`
(and task), else from its content hash (and how many identical rows precede it), so appending rows
to a file and importing it again imports only the new rows; rows already archived are skipped, and a
row `id` re-imported with different content is refused. Rows of unregistered tasks are skipped (the
dataset builder needs registered tasks: `klong tasks import` first).
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from consumers.chat import ChatTokenizer, TemplateError, to_openai
from consumers.tokenize import load_tokenizer
from klong.settings import Settings
from producers.import_formats import read_objects
from producers.paper_prefix import prefix_length
from schemas.arrow import encode_array
from schemas.claimcheck import MAX_EVENT_BYTES
from schemas.errors import BrokerError, ConfigError, TerminalError, ValidationError
from schemas.events import (Envelope, JudgeResult, JudgeResultPayload, RolloutEnded, RolloutEndedPayload,
                            RolloutStarted, RolloutStartedPayload, Step, StepPayload, ToolCall, new_event)

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
_NS = uuid.UUID("6f1c2a52-3f0e-4c39-9b7e-4a3c1e0d9b21")  # namespace of imported event ids
ID_PREFIX = "imp-"
MAX_ARGS_CHARS = MAX_EVENT_BYTES // 4  # tool call arguments stay in the step event (<= 4 bytes a char as JSON)


class TrajectoryImportError(TerminalError):
    """The import as a whole cannot go on (no such file, empty file, --strict with bad rows)."""


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


@dataclass(frozen=True)
class Imported:
    """What the report keeps of a good row (pass 2 parses the row again: memory stays O(rows), not O(file))."""
    line: int
    rollout_id: str
    row_hash: str
    task_id: str
    n_steps: int
    prefix: int
    score: Optional[float]


@dataclass
class ImportReport:
    imported: list[Imported] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)
    already: list[tuple[int, str]] = field(default_factory=list)  # (line, rollout_id): archived before
    warnings: list[str] = field(default_factory=list)
    events: int = 0

    @property
    def steps(self) -> int:
        return sum(r.n_steps for r in self.imported)


# ---- parsing one row ------------------------------------------------------------------------------


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


def parse_messages(messages: Any) -> tuple[Message, ...]:
    if not isinstance(messages, list) or not messages:
        raise RowError("`messages` must be a non-empty list of chat messages")
    out: list[Message] = []
    open_calls: Optional[tuple[ToolCall, ...]] = None  # calls of the last assistant message, if tools follow
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
        elif role == "assistant":
            open_calls = calls
        else:
            open_calls = None
        out.append(Message(role, text, calls, call_id if role == "tool" else None, *_recorded(m, role, where)))
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
    messages = parse_messages(obj.get("messages"))
    score = obj.get("score")
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))
                              or not math.isfinite(score) or not 0 <= score <= 1):
        raise RowError(f"`score` must be a number in [0, 1] (or absent), got {score!r}")
    row_id = obj.get("id")
    if row_id is not None and (isinstance(row_id, bool) or not isinstance(row_id, (str, int)) or row_id == ""):
        raise RowError(f"`id` must be a non-empty string or an integer, got {row_id!r}")
    group = obj.get(opts.group_field) if opts.group_field else obj.get("group_id", task_id)
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
    rollout_id = ID_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:32]
    model = obj.get("model") if isinstance(obj.get("model"), str) else ""
    tools = obj.get("tools") or []
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RowError("`tools` must be a list of OpenAI tool objects ({\"type\": \"function\", \"function\": "
                       "{\"name\", \"parameters\", ...}})")
    return Row(line, rollout_id, row_hash, task_id, group, messages, prefix, None if score is None else float(score),
               model[:256], tuple(tools))


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


# ---- events ---------------------------------------------------------------------------------------


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
    """Token ids per message: a model directory's chat template split per message (`consumers.chat`: the
    ids concatenated are `apply_chat_template(messages, tools)`), else each step content encoded alone."""
    if isinstance(tokenizer, ChatTokenizer):
        return tokenizer.message_spans(chat_messages(row), row.tools)
    return tokenizer.encode_batch([render(m) for m in row.messages])


def row_events(row: Row, tokenizer=None, timeout_s: float = 43200.0) -> list[Envelope]:
    """The events of one row, in emission order, with deterministic event ids."""
    n = 0

    def ev(cls, payload) -> Envelope:
        nonlocal n
        n += 1
        return new_event(cls, rollout_id=row.rollout_id, payload=payload, event_id=event_id(row, n - 1),
                         producer_id="klong-import")

    out = [ev(RolloutStarted, RolloutStartedPayload(task_id=row.task_id, group_id=row.group_id, timeout_s=timeout_s,
                                                    scaffold="import", model=row.model,
                                                    tokenizer=tokenizer.fingerprint if tokenizer is not None else ""))]
    contents = [render(m) for m in row.messages]
    ids = row_token_ids(row, tokenizer) if tokenizer is not None else [None] * len(contents)
    for i, (m, text, tok) in enumerate(zip(row.messages, contents, ids)):
        tok = m.token_ids if m.token_ids is not None else tok  # ids the harness recorded win (token-in/token-out)
        out.append(ev(Step, StepPayload(
            step_idx=i, role=m.role, content=text, tool_call=m.calls[0] if m.calls else None,
            tool_call_id=m.tool_call_id, pinned=i < row.prefix,
            token_ids=None if tok is None else encode_array(tok, "int32"),
            logprobs=None if m.logprobs is None else encode_array(m.logprobs, "float32"))))
    last = len(row.messages) - 1
    if row.score is not None:
        out.append(ev(JudgeResult, JudgeResultPayload(request_id=f"{row.rollout_id}-import", step_idx=last,
                                                      task_id=row.task_id, judge_model="import", score=row.score,
                                                      valid=True)))
    out.append(ev(RolloutEnded, RolloutEndedPayload(status="finished", n_steps=len(row.messages))))
    return out


# ---- the import -----------------------------------------------------------------------------------


def _archived(settings: Settings) -> tuple[dict[str, str], set[str]]:
    """(rollout_id -> event_id of its archived rollout_started, event ids of archived rollout_ended) of
    earlier imports. A row counts as imported once its last event (rollout_ended) is archived."""
    from store.catalog import Catalog

    con, where = Catalog(settings).connect(), f"WHERE starts_with(rollout_id, '{ID_PREFIX}')"
    try:
        started = con.execute(f"SELECT rollout_id, event_id FROM rollout_started_events {where}").fetchall()
        ended = con.execute(f"SELECT event_id FROM rollout_ended_events {where}").fetchall()
    finally:
        con.close()
    return dict(started), {e for (e,) in ended}


def validate(settings: Settings, path: str | Path, opts: ImportOptions, registered: Optional[dict] = None,
             checked: Callable[[int], None] = lambda n: None, tokenizer=None) -> ImportReport:
    """Pass 1: every row checked, nothing sent. `report.imported` holds the rows that would be imported.
    `checked(rows_so_far)` is called as rows are read. With a chat template (`tokenizer` a ChatTokenizer)
    every row is rendered too, so a row the template cannot split is skipped before anything is sent."""
    from producers.tasks import registered_tasks

    path = Path(path)
    if not path.is_file():
        raise TrajectoryImportError(f"{path}: no such file")
    registered = registered_tasks(settings) if registered is None else registered
    started, ended = _archived(settings)
    report, eval_tasks = ImportReport(), set()
    for n, (line, row, reason) in enumerate(read_rows(path, opts), 1):
        checked(n)
        if row is not None and row.task_id not in registered:
            row, reason = None, (f"task {row.task_id!r} is not registered (register it first: "
                                 "`klong tasks import DIR --split train`)")
        if row is not None and isinstance(tokenizer, ChatTokenizer):
            try:
                row_token_ids(row, tokenizer)
            except TemplateError as e:
                row, reason = None, str(e)
        if row is None:
            report.skipped.append((line, reason))
            continue
        if row.rollout_id in started and started[row.rollout_id] != event_id(row, 0):
            report.skipped.append((line, f"this row's id was imported before with different content "
                                         f"(rollout {row.rollout_id}); give the changed row a new `id`"))
            continue
        if event_id(row, n_events(row) - 1) in ended:
            report.already.append((line, row.rollout_id))
            continue  # (started but not ended: an import torn by a crash; sent again, the views dedupe)
        if "train" not in registered[row.task_id].splits:
            eval_tasks.add(row.task_id)
        report.imported.append(Imported(line, row.rollout_id, row.row_hash, row.task_id, len(row.messages),
                                        row.prefix, row.score))
    if not report.imported and not report.skipped and not report.already:
        raise TrajectoryImportError(f"{path}: the file has no rows (one JSON object per line)")
    report.warnings += [f"task {t!r} is in the eval split: its rollouts never enter a training dataset"
                        for t in sorted(eval_tasks)]
    return report


def import_trajectories(settings: Settings, path: str | Path, opts: ImportOptions = ImportOptions(), *,
                        progress: Callable[[int], None] = lambda n: None, flush_timeout: float = 120.0,
                        registered: Optional[dict] = None,
                        checked: Callable[[int], None] = lambda n: None) -> ImportReport:
    """Validates every row, then (unless dry_run, or strict with a bad row) emits the good rows through a
    durable outbox and waits until Kafka acked them. `checked(rows_read)` is called while rows are checked,
    `progress(rows_sent)` as rows go out."""
    from producers.outbox import Outbox
    from producers.recorder import publish

    tokenizer = load_tokenizer(opts.tokenizer) if opts.tokenizer else None  # a bad path fails before any work
    report = validate(settings, path, opts, registered, checked, tokenizer)
    if opts.strict and report.skipped:
        line, reason = report.skipped[0]
        raise TrajectoryImportError(f"{len(report.skipped)} bad row(s), nothing imported (--strict); "
                                    f"first: line {line}: {reason}")
    if opts.dry_run or not report.imported:
        return report
    wanted = {r.line: r for r in report.imported}
    with Outbox(settings, settings.outbox_dir / "import", fsync="batch") as box:
        done = 0
        for line, row, _ in read_rows(Path(path), opts):  # pass 2: the rows again, one at a time
            if line not in wanted:
                continue
            if row is None or row.row_hash != wanted[line].row_hash:
                raise TrajectoryImportError(f"{path} changed during the import (line {line}); {done} row(s) were "
                                            "sent: run the import again to finish (sent rows are skipped)")
            events = row_events(row, tokenizer, opts.timeout_s)
            for e in events:
                publish(box, e)
            report.events += len(events)
            done += 1
            progress(done)
        try:
            box.flush(timeout=flush_timeout, until="acked")
        except BrokerError as e:  # nothing is lost: the spool keeps the events and a later run sends them
            raise BrokerError(f"{e}; the events stay in {box.directory} and are sent by the next "
                              "`klong import trajectories` (any file) once Kafka is reachable") from e
    return report
