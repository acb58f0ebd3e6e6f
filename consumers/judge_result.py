"""What a judge run produces: the judge_result event of a finished request, and the run's counters.

    ev = build_result(job, "openai/gpt-oss-120b")   # JudgeResult: Q over the rubric tree, per-leaf scores, usage

A request with no valid leaf, or one that could not be graded (unknown task, unreadable snapshot), gets
valid=false and no score: never a zero standing in for a grade that did not happen. Explanations are
shortened evenly when the event would pass the size limit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

from consumers.judge_queue import Job
from schemas.claimcheck import MAX_EVENT_BYTES
from schemas.events import JudgeResult, JudgeResultPayload, LeafScore, encode, new_event
from schemas.rubric import aggregate


@dataclass
class JudgeStats:
    results: int = 0
    invalid_results: int = 0
    leaves: int = 0
    invalid_leaves: int = 0
    skipped: int = 0  # requests that already had a result
    bad_messages: int = 0  # not a judge request (the sink dead-letters them)
    recovered: int = 0  # results re-sent from the ledger's write-ahead files at start
    prompt_tokens: int = 0
    completion_tokens: int = 0
    waits: dict = field(default_factory=lambda: {"eval": [], "train": []})  # request produced -> started, s
    latencies: dict = field(default_factory=lambda: {"eval": [], "train": []})  # started -> result, s
    finished_at: float = 0.0  # epoch of the latest result


def build_result(job: Job, judge_model: str, max_bytes: int = MAX_EVENT_BYTES) -> JudgeResult:
    """The judge_result of a finished job: Q over the tree, per-leaf scores, usage; explanations are
    shortened evenly when the event would pass `max_bytes` (the real pinn tree has 1,963 leaves)."""
    grades = [job.grades[leaf["id"]] for leaf in job.leaves]
    failed = [g for g in grades if g.endpoint_error]
    if job.error:
        score, valid, error = None, False, job.error
    else:
        score = aggregate(job.context.task.rubric, {g.leaf_id: g.score for g in grades})
        valid = not failed
        error = f"{len(failed)} of {len(grades)} leaves not graded: {failed[0].explanation}"[:2000] if failed else None
        if grades and not any(g.valid for g in grades):  # nothing was graded: no score, not a zero
            valid, error = False, f"no leaf got a valid grade: {grades[0].explanation}"[:2000]
        if not valid:
            score = None
    base = dict(request_id=job.request_id, step_idx=job.payload.step_idx, task_id=job.payload.task_id,
                judge_model=judge_model, score=score, valid=valid, n_invalid_leaves=sum(not g.valid for g in grades),
                error=error, prompt_tokens=sum(g.prompt_tokens for g in grades),
                completion_tokens=sum(g.completion_tokens for g in grades),
                latency_s=max(0.0, time.time() - (job.started_at or time.time())))

    def build(cap: Optional[int]) -> JudgeResult:
        scores = [LeafScore(id=g.leaf_id, score=g.score, valid=g.valid,
                            explanation=g.explanation if cap is None or len(g.explanation) <= cap
                            else g.explanation[: max(cap - 1, 0)] + "…") for g in grades]
        return new_event(JudgeResult, rollout_id=job.rollout_id, payload=JudgeResultPayload(**base, leaf_scores=scores))

    ev = build(None)
    if len(encode(ev)) > max_bytes:
        cap = max(0, (max_bytes - len(encode(build(0)))) // max(len(grades), 1))
        ev = build(cap)
        while len(encode(ev)) > max_bytes and cap > 0:  # multi-byte characters and escapes
            cap //= 2
            ev = build(cap)
    return ev
