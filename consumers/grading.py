"""Grading one rubric leaf with an OpenAI-compatible chat model (PaperBench SimpleJudge style).

    client = ChatClient(GraderConfig(base_url="http://vllm:8000/v1", model="openai/gpt-oss-120b"))
    sub = load_submission(settings, "sha256:...")            # the snapshot: files of the submission
    grade = grade_leaf(client, task, sub, leaf)              # LeafGrade(score 0/1, valid, explanation, tokens)

Prompt: the system message holds the instructions, the paper and the addenda, identical for every
leaf of a task, so a vLLM server's prefix cache reuses it across the leaves; the user message holds
the submission's file listing, the files most relevant to this criterion (ranked by the criterion's
words in path and content, with `reproduce.sh` / logs first for execution and result criteria),
the criterion, its category's instructions and the answer format: a JSON object
`{"explanation": "...", "score": 0 or 1}`. Anything else (no JSON, a score of 0.5, an empty reply) is
an *invalid* leaf: score 0, counted, never retried and never fatal to the request.

The endpoint client and its errors are consumers.judge_endpoint, the snapshot reader consumers.submission;
this module re-exports their names.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import openai

from consumers.judge_endpoint import ChatClient, Completion, EndpointConfigError, EndpointError, GraderConfig, _describe
from consumers.submission import Submission, SubmissionError, load_submission

__all__ = ["CATEGORY_GUIDE", "DRAFT_INSTRUCTIONS", "EXECUTION_FILES", "ChatClient", "Completion", "EndpointConfigError",
           "EndpointError", "GraderConfig", "LeafGrade", "Submission", "SubmissionError", "draft_rubric", "grade_leaf",
           "json_objects", "leaf_prompt", "load_submission", "parse_verdict", "relevant_files", "system_prompt"]

CATEGORY_GUIDE = {
    "Code Development": "Judge whether the submission's code correctly implements what the criterion asks. "
                        "It does not need to have been run.",
    "Code Execution": "Judge whether the code was actually run and did what the criterion asks: look at "
                      "reproduce.sh, its log (reproduce.log) and the outputs it wrote.",
    "Result Analysis": "Judge whether the results the submission produced (logs, tables, figures, reports) "
                       "show what the criterion asks, consistent with the paper.",
}
EXECUTION_FILES = ("reproduce.sh", "reproduce.log")


@dataclass(frozen=True)
class LeafGrade:
    leaf_id: str
    score: float  # 0 or 1 (0 when invalid)
    valid: bool
    explanation: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    endpoint_error: bool = False  # invalid because the endpoint failed, not because the answer was malformed


# ---- prompts -------------------------------------------------------------------------------------------


_WORD = re.compile(r"[a-z][a-z0-9_]{2,}")
_STOP = frozenset("the and for has have been with that this from are was were into its their which using used "
                  "should code implemented implementation correctly paper results result".split())


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower())) - _STOP


def relevant_files(sub: Submission, leaf: dict, budget: int, per_file: int) -> list[tuple[str, str]]:
    """(path, text) of the files to show for this criterion, most relevant first, within `budget` chars."""
    words = _words(leaf.get("requirements", ""))
    category = leaf.get("task_category")

    def rank(item):
        path, text = item
        base = Path(path).name
        pinned = category in ("Code Execution", "Result Analysis") and base in EXECUTION_FILES
        hits = 3 * len(words & _words(path.replace("/", " ").replace(".", " "))) + len(words & _words(text[:200_000]))
        return (not pinned, -hits, len(text), path)

    chosen, used = [], 0
    for path, text in sorted(sub.files.items(), key=rank):
        if used >= budget:
            break
        body = text[: min(per_file, budget - used)]
        if len(body) < len(text):
            body += f"\n... [{len(text) - len(body)} more characters not shown]"
        chosen.append((path, body))
        used += len(body)
    return chosen


def system_prompt(task, cfg: GraderConfig) -> str:
    """Identical for every leaf of a task (a shared prefix for the server's prompt cache)."""
    paper = task.paper_md or "(the paper text is not available; judge from the criterion and the addenda)"
    if len(paper) > cfg.max_paper_chars:
        paper = paper[: cfg.max_paper_chars] + f"\n... [paper truncated: {len(paper) - cfg.max_paper_chars} characters]"
    parts = [
        "You are an expert reviewer grading an attempt to reproduce a research paper. You grade one rubric "
        "criterion at a time, strictly and only from the evidence in the submission's files. A criterion is "
        "met (score 1) only if the files clearly show it; otherwise it is not met (score 0).",
        f"# Paper: {task.title}\n\n{paper}",
    ]
    if task.addendum:
        parts.append(f"# Addendum (clarifications given to the submitter)\n\n{task.addendum}")
    if task.judge_addendum:
        parts.append(f"# Judge addendum (for you only)\n\n{task.judge_addendum}")
    return "\n\n".join(parts)


def leaf_prompt(sub: Submission, leaf: dict, cfg: GraderConfig) -> str:
    listing = "\n".join(sorted(sub.files) + [f"{p} (binary or too large, not shown)" for p in sub.skipped])
    shown = relevant_files(sub, leaf, cfg.max_files_chars, cfg.max_file_chars)
    files = "\n\n".join(f"## {path}\n```\n{text}\n```" for path, text in shown)
    category = leaf.get("task_category") or "Code Development"
    return (
        f"# Submission files\n{listing or '(the submission is empty)'}\n\n"
        f"# Relevant file contents\n{files or '(none)'}\n\n"
        f"# Criterion ({category})\n{leaf['requirements']}\n\n{CATEGORY_GUIDE.get(category, '')}\n\n"
        'Reply with one JSON object and nothing else: {"explanation": "<why, citing files>", "score": 0 or 1}'
    )


# ---- answers -------------------------------------------------------------------------------------------


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)
_LOOSE = re.compile(r'"?score"?\s*[:=]\s*"?([01])(?:\.0+)?"?(?![\d.])', re.I)


def json_objects(text: str) -> Iterator[dict]:
    """Every JSON object in a model reply: inside ``` fences first, then anywhere in the text."""
    decoder = json.JSONDecoder()
    for cand in [m.group(1) for m in _FENCE.finditer(text)] + [text]:
        start = cand.find("{")
        while start != -1:
            try:
                obj, _ = decoder.raw_decode(cand[start:])
                if isinstance(obj, dict):
                    yield obj
            except json.JSONDecodeError:
                pass
            start = cand.find("{", start + 1)


def parse_verdict(text: str) -> tuple[Optional[int], str]:
    """(0 | 1 | None for malformed, explanation). Accepts a JSON object (bare, fenced or embedded in
    prose) with `score` 0/1 (also "0"/"1", 0.0/1.0, true/false), else a `score: 0|1` line."""
    if not text or not text.strip():
        return None, "empty answer"
    for obj in json_objects(text):
        if "score" in obj:
            score = _as_binary(obj["score"])
            explanation = str(obj.get("explanation", "")).strip()
            if score is None:
                return None, f"score {obj['score']!r} is not 0 or 1: {explanation}"[:2000]
            return score, explanation
    m = _LOOSE.search(text)
    if m:
        return int(m.group(1)), text.strip()
    return None, f"no score in answer: {text.strip()[:500]}"


def _as_binary(v) -> Optional[int]:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, float)) and v in (0, 1):
        return int(v)
    if isinstance(v, str) and v.strip() in ("0", "1", "0.0", "1.0"):
        return int(float(v))
    return None


def grade_leaf(client: ChatClient, system: str, sub: Submission, leaf: dict) -> LeafGrade:
    """One leaf: a valid 0/1, or invalid (malformed answer, refused prompt, endpoint gave up).
    EndpointConfigError propagates: it concerns every leaf. A leaf with a `check` command is graded by
    running it on the submission instead (consumers.checks), never by the model."""
    from consumers.checks import grade_check, has_check

    if has_check(leaf):
        return grade_check(sub, leaf)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": leaf_prompt(sub, leaf, client.cfg)}]
    try:
        c = client.complete(messages)
    except EndpointError as e:
        return LeafGrade(leaf["id"], 0.0, False, str(e), endpoint_error=True)
    except (openai.BadRequestError, openai.UnprocessableEntityError) as e:
        return LeafGrade(leaf["id"], 0.0, False, f"endpoint refused the prompt: {_describe(e)}")
    score, explanation = parse_verdict(c.text)
    if score is None:
        return LeafGrade(leaf["id"], 0.0, False, f"invalid answer: {explanation}", c.prompt_tokens, c.completion_tokens)
    return LeafGrade(leaf["id"], float(score), True, explanation, c.prompt_tokens, c.completion_tokens)


# ---- drafting a rubric (the paper's evaluation agent) ------------------------------------------------


DRAFT_INSTRUCTIONS = """You design the grading rubric for reproducing a research paper, in PaperBench's rubric.json format.
Return one JSON object and nothing else: a tree of nodes, each with
  "id" (unique string), "requirements" (what must be true), "weight" (a number >= 0, relative importance among siblings),
  "sub_tasks" (a list of child nodes; empty for a leaf),
  "task_category" (leaves only: "Code Development", "Code Execution" or "Result Analysis"; null for parents),
  "finegrained_task_category" (leaves only, optional: one of "Environment & Infrastructure Setup",
  "Dataset and Model Acquisition", "Data Processing & Preparation", "Method Implementation", "Experimental Setup",
  "Evaluation, Metrics & Benchmarking", "Logging, Analysis & Presentation"; null for parents).
The root's requirements say the paper's core contributions have been reproduced. Leaves are specific, checkable
criteria about the method, the experimental setup and the reported results."""


def draft_rubric(client: ChatClient, title: str, paper_md: str, addendum: str = "") -> tuple[Optional[dict], str]:
    """(tree or None when the reply holds no JSON object, raw reply). The caller validates the tree."""
    paper = paper_md[: client.cfg.max_paper_chars]
    user = f"# Paper: {title}\n\n{paper}" + (f"\n\n# Addendum\n\n{addendum}" if addendum else "")
    c = client.complete([{"role": "system", "content": DRAFT_INSTRUCTIONS}, {"role": "user", "content": user}])
    return next(json_objects(c.text), None), c.text
