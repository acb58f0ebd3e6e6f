"""The reference agent runner: PaperBench's basic-agent loop with KLong's scaffold changes, against
any OpenAI-compatible policy endpoint, every step recorded through the RolloutRecorder.

    klong rollout run --task fre --base-url http://gpu-1:8000/v1 --model klong --timeout 7200
    >>> with Outbox(settings) as outbox:
    ...     res = run_agent(outbox, settings, "fre", PolicyEndpoint(url, "klong"), timeout_s=7200, group_id="g-1")

The loop (one tool call per assistant message; tools in `producers.agent_tools`):
- Pinned prefix: system prompt, task prompt, then the *mandatory paper reading*: until every line of
  paper.md (and addendum.md) was shown through read_file_chunk, other tools are refused with a
  pointer to the next unread chunk. All those steps are recorded `pinned=True`.
- end_task is refused before `min_time_fraction` of the timeout (and during the reading); after
  that it ends the rollout as `finished`. A message without a tool call gets PaperBench's
  "continue" nudge. A time reminder is added every `reminder_every_turns` turns.
- A context-length error prunes the context the model sees (the prefix always stays;
  `agent_policy.prune`) and calls again; the recorded trajectory keeps every step.
- Token-in/token-out (`AgentConfig.model_dir`, the policy's model directory): the context is kept as
  token ids and sent to vLLM's /v1/completions; sampled ids are recorded as sampled, observations as
  the ids the chat template adds for them, prunes as `context_start` (`producers.agent_context`).
  Without it the chat API is used and observation steps are text-only.
- `timeout_s` bounds the rollout's wall time: a policy or tool call is cut at the deadline and the
  rollout ends `timeout`, its steps kept. `RolloutControl` lets a scheduler carry the rollout into
  a new iteration/policy (a `rollout_resumed` event, later steps carry the new policy_version) or
  stop it (`aborted`), both at the next turn boundary.
- At the end (finished or timeout) the submission directory is snapshotted (`store_snapshot`) and,
  with `judge=True`, judged (priority eval for eval-split tasks).

This module sets a rollout up and tears it down (`run_agent`); the loop and its tool dispatch are
`producers.agent_loop`, the config, control handle and result records `producers.agent_config` (re-exported here).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

from core.settings import Settings
from producers import agent_prompts as prompts
from producers.agent_config import AgentConfig, AgentResult, RolloutControl
from producers.agent_context import chat_tokenizer
from producers.agent_loop import AgentLoop, snapshot
from producers.agent_policy import PolicyClient, PolicyEndpoint, tool_call_regex
from producers.agent_tools import TOOLS, ReadingTracker
from producers.outbox import Outbox
from producers.recorder import RolloutRecorder
from producers.sandbox import make_sandbox
from schemas.errors import KlongError, TerminalError
from schemas.events import TaskPayload

__all__ = ["PolicyEndpoint", "AgentConfig", "RolloutControl", "AgentResult", "run_agent", "find_task"]
log = logging.getLogger("klong.agent")
SCAFFOLD = "klong-basic-agent"


def find_task(settings: Settings, task_id: str) -> TaskPayload:
    """The latest registered version of a task: the archive, else the tasks topic (not archived yet)."""
    from producers.tasks import latest_task

    found = latest_task(settings, task_id)
    if found is None:
        raise TerminalError(f"task {task_id!r} is not registered (run `klong tasks import DIR --split train|eval`)")
    return found[0]


def _make_sandbox(config: AgentConfig, settings: Settings, rollout_id: str, blacklist: list[str] = ()):
    from producers.sandbox_net import allowed_hosts

    return make_sandbox(config.sandbox, Path(config.workdir) if config.workdir else settings.home / "rollouts",
                        config.limits, rollout_id=rollout_id, python=config.python, k8s_image=config.k8s_image,
                        k8s_namespace=config.k8s_namespace, allow_hosts=allowed_hosts(config.allow_hosts, blacklist))


def run_agent(outbox: Outbox, settings: Settings, task_id: str, policy: PolicyEndpoint, *, timeout_s: float,
              group_id: str, stage: int = 1, iteration: int = 0, policy_version: int = 0,
              rollout_id: Optional[str] = None, control: Optional[RolloutControl] = None,
              config: AgentConfig = AgentConfig(), judge: bool = True,
              task: Optional[TaskPayload] = None, resume=None) -> AgentResult:
    """One rollout of the basic-agent loop on a registered task (see the module docstring). Blocking;
    safe to call from many threads at once with one shared Outbox. `task`: the task's payload when
    the caller has it already (else looked up: archive, then the tasks topic). An unknown task
    raises TerminalError before anything is recorded; any later failure ends the rollout 'error'."""
    if timeout_s <= 0:
        raise KlongError(f"timeout_s must be positive, got {timeout_s}")
    from producers.tasks import resolve_task
    from schemas.claimcheck import BlobStore

    payload = task or find_task(settings, task_id)
    resolved = resolve_task(payload, BlobStore(settings.blob_dir))
    if resume is not None:  # continues where the log stops, in the iteration it was last in
        iteration, policy_version, stage = resume.iteration, resume.policy_version, resume.stage
    control = control or RolloutControl(iteration=iteration, policy_version=policy_version, stage=stage)
    rec = RolloutRecorder(outbox, task_id=task_id, group_id=group_id, timeout_s=timeout_s, rollout_id=rollout_id,
                          next_step_idx=resume.next_step_idx if resume else None,
                          elapsed_offset_s=resume.elapsed_s if resume else 0.0,
                          stage=stage, iteration=iteration, policy_version=policy_version, scaffold=SCAFFOLD,
                          model=policy.model,
                          tokenizer=chat_tokenizer(config.model_dir).fingerprint if config.model_dir else "")
    control.rollout_id = rec.rollout_id
    sandbox = _make_sandbox(config, settings, rec.rollout_id, payload.blacklist)
    client = PolicyClient(policy, request_token_ids=config.request_token_ids, temperature=config.temperature,
                          top_p=config.top_p, top_k=config.top_k, max_tokens=config.max_tokens, seed=config.seed,
                          tool_call_regex=tool_call_regex(TOOLS) if config.tool_call_grammar else None)
    loop, status, error, ref, request_id = None, "error", None, None, None
    try:
        rec.start()
        files = {"paper.md": resolved.paper_md, "blacklist.txt": "\n".join(payload.blacklist) + "\n"}
        if resolved.addendum:
            files["addendum.md"] = resolved.addendum
        sandbox.setup(files)
        required = [f"{sandbox.paper_dir}/{n}" for n in ("paper.md", "addendum.md") if files.get(n, "").strip()]
        reading = ReadingTracker({p: len(files[p.rsplit("/", 1)[1]].splitlines()) for p in required}) \
            if config.mandatory_reading and config.prompt == "paperbench" else None  # inline: the prompt holds it
        loop = AgentLoop(rec, sandbox, client, control, config, timeout_s, reading)
        if resume is not None and resume.steps:  # none recorded yet: it starts over with the prefix
            from producers.fleet_resume import restore

            restore(loop, resume)
        elif config.prompt == "inline":
            loop.observe(prompts.INLINE_SYSTEM, "system", True)
            loop.observe(prompts.inline_task(resolved.paper_md, resolved.addendum or "", sandbox.submission_dir),
                         "user", True)
        else:
            loop.observe(prompts.system_prompt(), "system", True)
            loop.observe(prompts.task_prompt(sandbox.paper_dir, sandbox.submission_dir, timeout_s,
                                             config.min_time_fraction, required, reading.status() if reading else "",
                                             "addendum.md" in files), "user", True)
        status, error = loop.run()
        # A carry-over the loop did not take (it ended inside a tool or policy call after the close) is taken
        # now: the rollout ends in the iteration the scheduler counts it in, not in one already built.
        carried = control._take()
        if carried:
            rec.resume(carried[0], carried[1])
        if status in ("finished", "timeout"):
            ref = snapshot(rec, sandbox)
            if judge:
                request_id = rec.request_judgment(priority="eval" if payload.split == "eval" else "train",
                                                  snapshot_ref=ref)
    except Exception as e:  # a scaffold failure ends the rollout 'error', recorded; the caller gets a result
        log.exception("rollout %s failed", rec.rollout_id)
        status, error = "error", f"{type(e).__name__}: {e}"[:2000]
    except BaseException as e:  # Ctrl-C / SystemExit: the operator stopped it
        status, error = "aborted", type(e).__name__
        raise
    finally:
        client.close()
        try:
            sandbox.close()
        except Exception as e:  # the rollout's record matters more than a pod left behind
            log.warning("rollout %s: sandbox cleanup failed: %s", rec.rollout_id, e)
        if not rec.ended:
            rec.end(status, error=error)
        control.done.set()
    elapsed = time.monotonic() - loop.t0 if loop else 0.0
    return AgentResult(rec.rollout_id, status, rec.n_steps, elapsed, ref, request_id, error,
                       loop.turns if loop else 0, loop.prunes if loop else 0)
