"""Reading PaperBench-format task folders (`producers.tasks` imports what they hold).

    src, problems = load_task_dir("papers/fre", "train")       # (TaskSource or None, every problem)
    sources = load_sources(["papers/fre", "papers/bam"], "train")   # raises TaskImportError listing all
    src.content_hash                                             # "sha256:..." over the task's content

A task folder holds `config.yaml` (`id`, `title`), `rubric.json` (validated by `schemas.rubric`: every
violation of every folder is reported, and then nothing is imported), and optionally `paper.md`,
`addendum.md`, `judge.addendum.md`, `blacklist.txt` (one URL a line; PaperBench writes `none` for no
URL). A folder without `paper.md` loads (listed in `missing`) unless `require_paper=True`. Text files
must be UTF-8; a rubric nested deeper than `schemas.events.MAX_JSON_DEPTH` is refused.

`content_hash` is a sha256 over the task's content (id, title, paper, addendum, judge addendum, rubric,
blacklist; not the split): the same hash is the same task version. `normalize_title` (NFKC, lower case,
punctuation and spacing folded) is what decontamination compares across splits.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import yaml

from schemas.errors import TerminalError, ValidationError
from schemas.events import MAX_JSON_DEPTH, check_json_depth
from schemas.rubric import RubricReport, validate_rubric

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
