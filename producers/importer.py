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
(`core.chat`): the step ids concatenated are `apply_chat_template(messages, tools)`, tool calls and
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
row `id` re-imported with different content is refused, naming the file and line it came from before,
even when that import is not archived yet (`producers.import_ledger`, written before anything is sent).
Rows of unregistered tasks are skipped (the dataset builder needs registered tasks: `klong tasks import`
first). What an import changes or guesses in a row (a tool message linked to the one open call, recorded
token ids not kept) is a warning naming the file and line. A row's `tools` travel in its rollout_started
event: a dataset build with `tokenizer=MODEL_DIR` renders them (the template's `<tools>` block) for a
rollout imported text-only, as an import with `--tokenizer` does.
"""


from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from core.chat import TemplateError
from core.tokenize import load_tokenizer
from core.settings import Settings
from producers.import_events import (chat_messages, event_id, n_events, render, row_events, row_token_ids,
                                     token_plan)
from producers.import_ledger import Ledger
from producers.import_rows import (ID_PREFIX, MAX_ARGS_CHARS, ROLES, ImportOptions, Message, Row, RowError,
                                   parse_messages, parse_row, read_rows)
from schemas.errors import BrokerError, TerminalError

# Re-exported: callers import these from producers.importer.
__all__ = ["ROLES", "ID_PREFIX", "MAX_ARGS_CHARS", "TrajectoryImportError", "RowError", "ImportOptions", "Message",
           "Row", "Imported", "ImportReport", "parse_messages", "parse_row", "read_rows", "render", "n_events",
           "event_id", "chat_messages", "row_token_ids", "row_events", "validate", "import_trajectories"]


class TrajectoryImportError(TerminalError):
    """The import as a whole cannot go on (no such file, empty file, --strict with bad rows)."""



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
    ledger = Ledger(settings.home)
    report, eval_tasks = ImportReport(), set()
    for n, (line, row, reason) in enumerate(read_rows(path, opts), 1):
        checked(n)
        if row is not None and row.task_id not in registered:
            row, reason = None, (f"task {row.task_id!r} is not registered (register it first: "
                                 "`klong tasks import DIR --split train`)")
        plan_warning = None
        if row is not None:
            try:
                _, _, plan_warning = token_plan(row, tokenizer)
            except TemplateError as e:
                row, reason = None, str(e)
        if row is None:
            report.skipped.append((line, reason))
            continue
        if row.rollout_id in started and started[row.rollout_id] != event_id(row, 0):
            report.skipped.append((line, f"this row's id was imported before with different content "
                                         f"(rollout {row.rollout_id}, {path.name} line {line}); give the changed row "
                                         "a new `id`"))
            continue
        earlier = ledger.conflict(row.rollout_id, row.row_hash)
        if earlier is not None:  # not archived yet, maybe: the ledger knows at once
            report.skipped.append((line, f"this row's id was imported before from {earlier} with different "
                                         f"content (rollout {row.rollout_id}); give the changed row a new `id`"))
            continue
        if event_id(row, n_events(row) - 1) in ended:
            report.already.append((line, row.rollout_id))
            continue  # (started but not ended: an import torn by a crash; sent again, the views dedupe)
        if "train" not in registered[row.task_id].splits:
            eval_tasks.add(row.task_id)
        notes = list(row.warnings) + ([plan_warning] if plan_warning else [])
        report.warnings += [f"{path.name} line {line}: {w}" for w in notes]
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
    # (line, rollout id): a line may hold several rows (an ATIF trajectory and its sub-trajectories)
    wanted = {(r.line, r.rollout_id): r for r in report.imported}
    Ledger(settings.home).record(path, [(r.line, r.rollout_id, r.row_hash) for r in report.imported])
    lines = {r.line for r in report.imported}

    def changed(line: int) -> TrajectoryImportError:
        return TrajectoryImportError(f"{path} changed during the import (line {line}); {done} row(s) were "
                                     "sent: run the import again to finish (sent rows are skipped)")

    with Outbox(settings, settings.outbox_dir / "import", fsync="batch") as box:
        done = 0
        for line, row, _ in read_rows(Path(path), opts):  # pass 2: the rows again, one at a time
            if line not in lines:
                continue
            if row is None:
                raise changed(line)
            want = wanted.get((line, row.rollout_id))
            if want is None:
                continue  # imported before (report.already)
            if row.row_hash != want.row_hash:
                raise changed(line)
            events = row_events(row, tokenizer, opts.timeout_s)
            for e in events:
                publish(box, e)
            report.events += len(events)
            done += 1
            progress(done)
        if done != len(wanted):
            raise changed(max(lines))
        try:
            box.flush(timeout=flush_timeout, until="acked")
        except BrokerError as e:  # nothing is lost: the spool keeps the events and a later run sends them
            raise BrokerError(f"{e}; the events stay in {box.directory} and are sent by the next "
                              "`klong import trajectories` (any file) once Kafka is reachable") from e
    return report
