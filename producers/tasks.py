"""The task registry: PaperBench-format task folders -> `task_registered` events (Research-Factory output).

    klong tasks import papers/fre papers/bam --split train
    >>> plan = import_tasks(settings, ["papers/fre"], split="train")   # ImportPlan: new, changed, unchanged

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

import hashlib
import json
import logging
import os
import re
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import msgspec
import yaml

from klong.settings import Settings
from producers.outbox import Outbox
from schemas.claimcheck import MAX_EVENT_BYTES, BlobStore
from schemas.errors import BrokerError, TerminalError, ValidationError
from schemas.events import (MAX_JSON_DEPTH, Envelope, TaskPayload, TaskRegistered, check_json_depth, decode, encode,
                            new_event)
from schemas.rubric import RubricReport, validate_rubric

log = logging.getLogger("klong.tasks")

SPLITS = ("train", "eval")


class TaskImportError(TerminalError):
    """One or more task folders cannot be imported; the message lists every problem. Nothing was emitted."""


@dataclass(frozen=True)
class TaskSource:
    """One task folder, read and validated."""

    path: Path
    task_id: str
    title: str
    split: str
    rubric: dict
    paper_md: Optional[str]
    addendum: str
    judge_addendum: str
    blacklist: list[str]
    report: RubricReport
    missing: tuple[str, ...]  # optional files that are absent

    @property
    def content_hash(self) -> str:
        return content_hash(self.task_id, self.title, self.paper_md, self.addendum, self.judge_addendum,
                            self.rubric, self.blacklist)


@dataclass(frozen=True)
class Registered:
    """What is already registered under one task id (all versions)."""

    task_id: str
    splits: frozenset
    titles: frozenset  # normalized
    latest_hash: str
    hashes: frozenset


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


# ---- reading folders ------------------------------------------------------------------------------


def normalize_title(title: str) -> str:
    text = unicodedata.normalize("NFKC", title).casefold()
    return " ".join(re.sub(r"[^\w]+", " ", text).split())


def content_hash(task_id: str, title: str, paper_md: Optional[str], addendum: str, judge_addendum: str,
                 rubric, blacklist: list[str]) -> str:
    doc = {"task_id": task_id, "title": title, "paper_sha256": hashlib.sha256((paper_md or "").encode()).hexdigest(),
           "addendum": addendum, "judge_addendum": judge_addendum, "rubric": rubric, "blacklist": blacklist}
    canon = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return "sha256:" + hashlib.sha256(canon).hexdigest()


def _read_text(path: Path) -> Optional[str]:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as e:
        raise ValidationError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from e


def load_task_dir(path: str | os.PathLike, split: str, *, strict_ids: bool = False,
                  require_paper: bool = False) -> tuple[Optional[TaskSource], list[str]]:
    """(TaskSource or None, problems). Every problem of the folder is listed, never only the first."""
    d = Path(path)
    problems: list[str] = []
    if not d.is_dir():
        return None, [f"{d}: not a directory"]
    cfg_text = _read_text(d / "config.yaml")
    cfg: dict = {}
    if cfg_text is None:
        problems.append(f"{d / 'config.yaml'}: missing (needs `id:` and `title:`)")
    else:
        try:
            loaded = yaml.safe_load(cfg_text)
            cfg = loaded if isinstance(loaded, dict) else {}
            if not isinstance(loaded, dict):
                problems.append(f"{d / 'config.yaml'}: must be a mapping with `id:` and `title:`")
        except yaml.YAMLError as e:
            problems.append(f"{d / 'config.yaml'}: not valid YAML: {e}")
    task_id, title = cfg.get("id"), cfg.get("title")
    if cfg and not (isinstance(task_id, str) and task_id.strip() and len(task_id) <= 256):
        problems.append(f"{d / 'config.yaml'}: `id` must be a non-empty string (<= 256 chars), got {task_id!r}")
    if cfg and not (isinstance(title, str) and title.strip()):
        problems.append(f"{d / 'config.yaml'}: `title` must be a non-empty string, got {title!r}")
    rubric, report = None, RubricReport()
    rubric_text = _read_text(d / "rubric.json")
    if rubric_text is None:
        problems.append(f"{d / 'rubric.json'}: missing")
    else:
        try:
            rubric = json.loads(rubric_text)
            check_json_depth(rubric, "the rubric")  # the validator walks the tree recursively
        except json.JSONDecodeError as e:
            problems.append(f"{d / 'rubric.json'}: not valid JSON: {e}")
        except (RecursionError, ValueError) as e:
            problems.append(f"{d / 'rubric.json'}: nested too deep (at most {MAX_JSON_DEPTH} levels of JSON objects "
                            "and arrays)")
        else:
            report = validate_rubric(rubric, strict_ids=strict_ids)
            problems.extend(f"{d / 'rubric.json'} {v}" for v in report.errors)
    paper = _read_text(d / "paper.md")
    missing = tuple(name for name in ("paper.md", "addendum.md", "judge.addendum.md", "blacklist.txt")
                    if not (d / name).is_file())
    if paper is None and require_paper:
        problems.append(f"{d / 'paper.md'}: missing (--require-paper)")
    blacklist = [line.strip() for line in (_read_text(d / "blacklist.txt") or "").splitlines()]
    blacklist = [u for u in blacklist if u and u.lower() != "none"]
    if split not in SPLITS:
        problems.append(f"split must be one of {SPLITS}, got {split!r}")
    if problems:
        return None, problems
    return TaskSource(d, task_id.strip(), title.strip(), split, rubric, paper,
                      _read_text(d / "addendum.md") or "", _read_text(d / "judge.addendum.md") or "",
                      blacklist, report, missing), []


# ---- what is registered -----------------------------------------------------------------------------


def registry_file(settings: Settings) -> Path:
    return settings.home / "tasks" / "registry.jsonl"


def read_registry(settings: Settings) -> list[dict]:
    """This home's registry lines (task_id, title, split, content_hash, t, event_id)."""
    path = registry_file(settings)
    rows = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a crash: its event is in the spool and shows up in Kafka
    return rows


def read_topic(settings: Settings, topic: str, timeout_s: float = 10.0) -> list[Envelope]:
    """Every valid event of a topic, read from its start to its end (no consumer group)."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.errors import KafkaError

    try:
        consumer = KafkaConsumer(**settings.kafka_config(), enable_auto_commit=False, group_id=None,
                                 request_timeout_ms=5000, fetch_max_wait_ms=50)
    except KafkaError as e:
        raise BrokerError(f"cannot reach Kafka at {settings.bootstrap()}: {e}") from e
    out: list[Envelope] = []
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or set())]
        if not tps:
            return out
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise BrokerError(f"reading {topic} did not finish within {timeout_s}s")
            for records in consumer.poll(timeout_ms=100).values():
                for r in records:
                    try:
                        out.append(decode(r.value or b""))
                    except ValidationError:
                        continue  # the sink dead-letters it
        return out
    except KafkaError as e:
        raise BrokerError(f"reading {topic} failed: {e}") from e
    finally:
        consumer.close()


def read_task_events(settings: Settings, timeout_s: float = 10.0) -> list[TaskRegistered]:
    """Every task event in the tasks topic (registered, maybe not archived yet)."""
    return [ev for ev in read_topic(settings, settings.topics.tasks, timeout_s) if isinstance(ev, TaskRegistered)]


# The archive's task events with every payload field, for `payload_from_row`.
ARCHIVED_TASKS_SQL = """
    SELECT task_id, title, split, paper_md, paper_ref, addendum, judge_addendum, rubric, blacklist, content_hash,
           epoch(produced_at) AS t FROM task_registered_events"""


def payload_from_row(row: dict) -> TaskPayload:
    """A row of ARCHIVED_TASKS_SQL -> the TaskPayload it was archived from (the rubric is JSON text there)."""
    fields = {k: row[k] for k in TaskPayload.__struct_fields__ if k in row}
    return TaskPayload(**{**fields, "rubric": json.loads(row["rubric"]) if row["rubric"] else None,
                          "blacklist": row["blacklist"] or []})


def latest_task(settings: Settings, task_id: str) -> Optional[tuple[TaskPayload, int, bool]]:
    """(latest TaskPayload, number of versions, archived?) of a registered task, None if it is unknown: from
    the archive, else from the tasks topic (registered a moment ago, not archived yet). Raises BrokerError
    when the task is not archived and Kafka is unreachable."""
    from store.catalog import Catalog, sql_str

    rows = Catalog(settings).arrow(
        f"SELECT * FROM ({ARCHIVED_TASKS_SQL}) WHERE task_id = {sql_str(task_id)} ORDER BY t").to_pylist()
    if rows:
        return payload_from_row(rows[-1]), len({r["content_hash"] for r in rows}), True
    evs = sorted((e for e in read_task_events(settings) if e.payload.task_id == task_id), key=lambda e: e.produced_at)
    if not evs:
        return None
    return evs[-1].payload, len({e.payload.content_hash for e in evs}), False


def _registrations(settings: Settings, kafka: bool) -> list[dict]:
    """(task_id, title, split, content_hash, produced_at) of every registration this home can see."""
    from store.catalog import Catalog

    rows = Catalog(settings).arrow(
        "SELECT task_id, title, split, content_hash, epoch(produced_at) AS t FROM task_registered_events").to_pylist()
    rows += read_registry(settings)
    if kafka:
        try:
            for ev in read_task_events(settings):
                p = ev.payload
                rows.append({"task_id": p.task_id, "title": p.title, "split": p.split,
                             "content_hash": p.content_hash, "t": ev.produced_at.timestamp()})
        except BrokerError as e:
            log.warning("tasks: cannot read the tasks topic (%s); checking the archive and %s only", e,
                        registry_file(settings))
    return rows


def registered_tasks(settings: Settings, *, kafka: bool = True) -> dict[str, Registered]:
    by_id: dict[str, list[dict]] = {}
    for r in _registrations(settings, kafka):
        by_id.setdefault(r["task_id"], []).append(r)
    out = {}
    for tid, rows in by_id.items():
        latest = max(rows, key=lambda r: r["t"])
        out[tid] = Registered(tid, frozenset(r["split"] for r in rows), frozenset(normalize_title(r["title"]) for r in rows),
                              latest["content_hash"], frozenset(r["content_hash"] for r in rows))
    return out


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


def _append_registry(settings: Settings, ev: TaskRegistered) -> None:
    path = registry_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    p = ev.payload
    line = json.dumps({"task_id": p.task_id, "title": p.title, "split": p.split, "content_hash": p.content_hash,
                       "t": ev.produced_at.timestamp(), "event_id": ev.event_id}) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def load_sources(dirs: Iterable[str | os.PathLike], split: str, *, strict_ids: bool = False,
                 require_paper: bool = False) -> list[TaskSource]:
    """Reads every folder; raises TaskImportError listing the problems of all of them."""
    sources, problems = [], []
    for d in dirs:
        src, errs = load_task_dir(d, split, strict_ids=strict_ids, require_paper=require_paper)
        problems.extend(errs)
        if src:
            sources.append(src)
    if problems:
        raise TaskImportError(f"{len(problems)} problem(s), nothing imported:\n  " + "\n  ".join(problems))
    return sources


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
            _append_registry(settings, ev)
        if own:
            box.flush(until="acked")
    finally:
        if own:
            box.close()
    return plan
