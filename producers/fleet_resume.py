"""Rebuilds a rollout's agent loop from its recorded steps, so a fleet worker continues a rollout another
worker started (that worker was lost): the same context the model saw, the next step_idx.

    >>> restore(loop, resume)     # loop: producers.agent_loop.AgentLoop; resume: producers.fleet_log.ResumePoint

Chat API (text): the recorded steps become the message list again (an assistant step's tool call answered
by the tool step after it). Token-in/token-out: each step's recorded ids rejoin the TokenContext as they
were (nothing re-tokenized), then the context is cut as the last step's `context_start` says (a prune
before the loss). The time used so far counts against the rollout's timeout. The mandatory reading counts
as done once a step after it (not pinned) was recorded; a rollout lost during the reading reads again
(those steps are pinned too: the prefix grows). The sandbox is the one `run_agent` set up: with the same
data home (one machine, or a shared volume) the submission directory of the lost worker is still there.
"""

from __future__ import annotations

import time

import numpy as np

from producers.fleet_log import ResumePoint
from schemas.errors import TerminalError

LOST_CALL = ("(This function call's worker was lost before its output was recorded: the call may or may not "
             "have run. Check the state of the files before you go on.)")


def _message(step: dict, next_step: dict | None) -> dict:
    msg = {"role": step["role"], "content": step["content"] or ""}
    if step["role"] == "tool" and step.get("tool_call_id") is not None:
        msg["tool_call_id"] = step["tool_call_id"]
    call = step.get("tool_call")
    if step["role"] == "assistant" and call:
        call_id = call.get("id") or (next_step or {}).get("tool_call_id") or f"call-{step['step_idx']}"
        msg["tool_calls"] = [{"id": call_id, "type": "function",
                              "function": {"name": call["name"], "arguments": call.get("arguments") or ""}}]
    return msg


def restore(loop, resume: ResumePoint) -> None:
    """Loads `resume.steps` into `loop` (an AgentLoop whose recorder continues at resume.next_step_idx)."""
    steps = resume.steps
    if loop.ctx is not None:
        missing = [s["step_idx"] for s in steps if s.get("token_ids") is None]
        if missing:
            raise TerminalError(f"cannot resume rollout {loop.rec.rollout_id} token-in/token-out: steps {missing[:10]} "
                                "were recorded without token_ids")
        for s in steps:
            msg = {"role": s["role"], "content": s["content"] or ""}
            if s["role"] == "tool" and s.get("tool_call_id") is not None:
                msg["tool_call_id"] = s["tool_call_id"]
            loop.ctx._append(msg, np.asarray(s["token_ids"], dtype=np.int32), s["step_idx"], bool(s["pinned"]))
        # the context the latest step was produced in: [0, P) ++ [start, last] (every token step records it)
        start = next((s["context_start"] for s in reversed(steps) if s.get("context_start") is not None), None)
        if start is not None:
            keep = [i for i, st in enumerate(loop.ctx.steps) if i < loop.ctx.n_prefix or st >= start]
            loop.ctx.messages = [loop.ctx.messages[i] for i in keep]
            loop.ctx.ids = [loop.ctx.ids[i] for i in keep]
            loop.ctx.steps = [loop.ctx.steps[i] for i in keep]
    else:
        for i, s in enumerate(steps):
            loop.messages.append(_message(s, steps[i + 1] if i + 1 < len(steps) else None))
            loop.n_prefix += bool(s["pinned"])
    loop.turns = sum(s["role"] == "assistant" for s in steps)
    if loop.reading is not None and any(not s["pinned"] for s in steps):
        loop.reading = None  # read in full before the loss
    loop.t0 = time.monotonic() - resume.elapsed_s
    last = steps[-1]
    if last["role"] == "assistant" and last.get("tool_call"):  # lost between the call and its output
        call_id = last["tool_call"].get("id") or f"call-{last['step_idx']}"
        loop.observe(LOST_CALL, "tool", bool(last["pinned"]), tool_call_id=call_id)
