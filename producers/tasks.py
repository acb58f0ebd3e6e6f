"""The task registry: PaperBench-format task folders -> `task_registered` events (Research-Factory output).

    klong tasks import papers/fre papers/bam --split train
    >>> plan = import_tasks(settings, ["papers/fre"], split="train")   # ImportPlan: new, changed, unchanged

This module plans an import (new / changed / unchanged, decontamination), builds the events under the size
limit and resolves a registered task's references; reading folders is `producers.task_source`, what is
registered is `producers.task_registry` (their names are importable from here too).

A task folder holds `config.yaml` (`id`, `title`), `rubric.json` (validated by `schemas.rubric`: every
violation of every folder is reported, and then nothing is imported), and optionally `paper.md`,
`addendum.md`, `judge.addendum.md`, `blacklist.txt` (one URL a line; PaperBench writes `none` for no
URL). Paper and addendum markdown are optional because PaperBench keeps them in Git LFS (the shared
copy has none): a folder without `paper.md` imports with a warning and the judge grades without the
paper; `require_paper=True` (`--require-paper`) refuses such folders instead.

Versions: `content_hash` is a sha256 over the task's content (id, title, paper, addendum, judge
addendum, rubric, blacklist; not the split). Importing a task whose latest registered hash is the same
is a no-op; a different hash emits a new event, i.e. a new task version. What is registered is the
union of (1) the archive (`task_registered_events`), (2) the tasks topic in Kafka (events not archived
yet) and (3) this home's registry file `HOME/tasks/registry.jsonl` (one line per event this home put
into its outbox, written right after the put: it covers the time before Kafka has the event).

Decontamination: a task id or normalized title (NFKC, lower case, punctuation and spacing folded)
registered in one split can never be imported into the other; the import is refused, nothing emitted.

Size: events stay under `schemas.claimcheck.MAX_EVENT_BYTES`. The paper goes inline (`paper_md`) when
the event fits, else into the BlobStore (`paper_ref = "sha256:..."`); a rubric still too large (the
real `pinn` tree is 1.1 MB) goes to the BlobStore too and the event's `rubric` field then holds its
reference as a JSON *string* `"sha256:..."` instead of the tree object (`resolve_task` and the
`rubric_nodes` view follow it). Blobs live under `HOME/blobs`: a judge on another machine needs that
folder shared, as for claim-checked steps.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterable, Optional

import msgspec

from core.settings import Settings
from producers.outbox import Outbox
from producers.task_registry import (ARCHIVED_TASKS_SQL, Registered, append_registry, latest_task, payload_from_row,
                                     read_registry, read_task_events, read_topic, registered_tasks, registry_file)
from producers.task_source import (SPLITS, TaskImportError, TaskSource, content_hash, load_sources, load_task_dir,
                                   normalize_title)
from schemas.claimcheck import MAX_EVENT_BYTES, BlobStore
from schemas.errors import ValidationError
from schemas.events import TaskPayload, TaskRegistered, encode, new_event
from schemas.rubric import validate_rubric

# Re-exported: callers import these from producers.tasks.
__all__ = ["SPLITS", "TaskImportError", "TaskSource", "Registered", "ImportPlan", "ResolvedTask", "normalize_title",
           "content_hash", "load_task_dir", "load_sources", "registry_file", "read_registry", "read_topic",
           "read_task_events", "ARCHIVED_TASKS_SQL", "payload_from_row", "latest_task", "registered_tasks",
           "plan_import", "task_event", "resolve_task", "import_tasks"]


@dataclass
class ImportPlan:
    new: list[TaskSource] = field(default_factory=list)
    changed: list[TaskSource] = field(default_factory=list)  # registered with another content: a new version
    unchanged: list[TaskSource] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def to_emit(self) -> list[TaskSource]:
        return self.new + self.changed


@dataclass(frozen=True)
class ResolvedTask:
    """A registered task with its references followed: what the judge grades against."""

    task_id: str
    title: str
    split: str
    paper_md: str
    addendum: str
    judge_addendum: str
    rubric: dict
    content_hash: str


def plan_import(sources: list[TaskSource], registered: dict[str, Registered]) -> ImportPlan:
    """Sorts sources into new / changed / unchanged; raises TaskImportError on any split conflict."""
    plan, conflicts = ImportPlan(), []
    title_splits: dict[str, set] = {}
    for r in registered.values():
        for t in r.titles:
            title_splits.setdefault(t, set()).update(r.splits)
    seen: dict[str, TaskSource] = {}
    for src in sources:
        other = "eval" if src.split == "train" else "train"
        reg = registered.get(src.task_id)
        if reg and other in reg.splits:
            conflicts.append(f"{src.path}: task id {src.task_id!r} is registered in the {other} split; "
                             f"a task may not be in both splits (decontamination)")
        norm = normalize_title(src.title)
        if other in title_splits.get(norm, set()):
            conflicts.append(f"{src.path}: title {src.title!r} matches a task registered in the {other} split "
                             f"(normalized {norm!r}); a task may not be in both splits (decontamination)")
        if src.task_id in seen:
            if seen[src.task_id].content_hash != src.content_hash:
                conflicts.append(f"{src.path}: task id {src.task_id!r} also comes from {seen[src.task_id].path} "
                                 "with different content; import one of them")
            continue
        seen[src.task_id] = src
        if reg is None:
            plan.new.append(src)
        elif reg.latest_hash == src.content_hash:
            plan.unchanged.append(src)
        else:
            plan.changed.append(src)
        if src.split in title_splits.get(norm, set()) and (reg is None or norm not in reg.titles):
            plan.warnings.append(f"{src.path}: title {src.title!r} is also registered under another task id")
    if conflicts:
        raise TaskImportError("refused, nothing imported:\n  " + "\n  ".join(conflicts))
    return plan


# ---- events -----------------------------------------------------------------------------------------


def task_event(src: TaskSource, blobs: BlobStore) -> TaskRegistered:
    """The event for one task, under the size limit: paper, then rubric, move to the BlobStore if needed."""
    payload = TaskPayload(task_id=src.task_id, title=src.title, split=src.split, paper_md=src.paper_md,
                          addendum=src.addendum, judge_addendum=src.judge_addendum, rubric=src.rubric,
                          blacklist=src.blacklist, content_hash=src.content_hash)
    ev = new_event(TaskRegistered, payload=payload)
    if len(encode(ev)) > MAX_EVENT_BYTES and src.paper_md:
        ref = blobs.put(src.paper_md.encode())
        ev = msgspec.structs.replace(ev, payload=msgspec.structs.replace(payload, paper_md=None, paper_ref=ref))
    if len(encode(ev)) > MAX_EVENT_BYTES:
        ref = blobs.put(json.dumps(src.rubric, separators=(",", ":"), ensure_ascii=False).encode())
        ev = msgspec.structs.replace(ev, payload=msgspec.structs.replace(ev.payload, rubric=ref))
    size = len(encode(ev))
    if size > MAX_EVENT_BYTES:
        raise TaskImportError(f"{src.path}: the task event is {size} bytes even with paper and rubric in the blob "
                              f"store (limit {MAX_EVENT_BYTES}); shorten the addenda or the blacklist")
    return ev


def resolve_task(payload: TaskPayload, blobs: BlobStore) -> ResolvedTask:
    """Follows `paper_ref` and a rubric reference; checks the rubric again (a consumer trusts no producer)."""
    paper = payload.paper_md if payload.paper_md is not None else (
        blobs.get(payload.paper_ref).decode() if payload.paper_ref else "")
    rubric = payload.rubric
    if isinstance(rubric, str):
        rubric = json.loads(blobs.get(rubric))
    report = validate_rubric(rubric)
    if report.errors:
        raise ValidationError(f"task {payload.task_id}: registered rubric is invalid: {report.errors[0]}")
    return ResolvedTask(payload.task_id, payload.title, payload.split, paper, payload.addendum,
                        payload.judge_addendum, rubric, payload.content_hash)


def import_tasks(settings: Settings, dirs: Iterable[str | os.PathLike], split: str, *,
                 outbox: Optional[Outbox] = None, strict_ids: bool = False, require_paper: bool = False,
                 dry_run: bool = False, kafka: bool = True) -> ImportPlan:
    """Validates every folder, checks splits, emits one event per new or changed task.

    `outbox`: where the events go (default: this home's `outbox/tasks` spool, kept until the sink has
    archived them; the call returns once Kafka acked them)."""
    sources = load_sources(dirs, split, strict_ids=strict_ids, require_paper=require_paper)
    plan = plan_import(sources, registered_tasks(settings, kafka=kafka))
    if dry_run or not plan.to_emit:
        return plan
    blobs = BlobStore(settings.blob_dir)
    events = [task_event(src, blobs) for src in plan.to_emit]  # all sizes checked before anything is sent
    own = outbox is None
    box = outbox or Outbox(settings, settings.outbox_dir / "tasks")
    try:
        for ev in events:
            box.put(ev)
            append_registry(settings, ev)
        if own:
            box.flush(until="acked")
    finally:
        if own:
            box.close()
    return plan
