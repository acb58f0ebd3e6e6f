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
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from klong.settings import Settings
from producers import agent_prompts as prompts
from producers.agent_context import TokenContext, chat_tokenizer
from producers.agent_policy import (ContextLengthExceeded, PolicyClient, PolicyEndpoint, PolicyTimeout, prune,
                                    tool_call_regex)
from producers.agent_tools import TOOLS, ReadingTracker, ToolOutput, execute, parse_arguments, ToolError
from producers.judge_requests import store_snapshot
from producers.outbox import Outbox
from producers.recorder import RolloutRecorder
from producers.sandbox import SANDBOX_KINDS, SandboxLimits, make_sandbox
from schemas.errors import ConfigError, KlongError, TerminalError, TransientError
from schemas.events import TaskPayload

__all__ = ["PolicyEndpoint", "AgentConfig", "RolloutControl", "AgentResult", "run_agent", "find_task"]
log = logging.getLogger("klong.agent")
SCAFFOLD = "klong-basic-agent"


@dataclass(frozen=True)
class AgentConfig:
    min_time_fraction: float = 0.5  # end_task refused before this fraction of timeout_s
    reminder_every_turns: int = 5  # a time reminder every N turns after the reading (0: never)
    prune_ratio: float = 0.3  # share of the non-prefix context dropped on a context-length error
    mandatory_reading: bool = True  # paper.md (+ addendum.md) read in full before other tools
    sandbox: Literal["local", "unsafe-local", "k8s"] = "local"  # producers.sandbox: local = isolated namespaces
    limits: SandboxLimits = field(default_factory=SandboxLimits)
    allow_hosts: tuple[str, ...] = ()  # local sandbox: HTTP(S) to these hosts only (never a blacklisted one)
    workdir: Optional[str] = None  # parent of the per-rollout sandbox dirs (default HOME/rollouts)
    python: str = "python3"  # interpreter of the python tool inside the sandbox
    k8s_image: str = "python:3.11-slim"
    k8s_namespace: str = "default"
    request_token_ids: bool = True  # ask for vLLM's token-id extras (off for plain OpenAI endpoints)
    temperature: float = 1.0
    max_tokens: Optional[int] = None  # per completion
    max_transient_errors: int = 3  # consecutive policy failures (after the client's retries) before 'error'
    snapshot_every_turns: int = 0  # extra snapshots during the rollout (0: only at the end)
    # The policy's model directory (tokenizer + chat template, `klong model import`): token-in/token-out through
    # /v1/completions (producers.agent_context). None: the chat API, observation steps text-only.
    model_dir: Optional[str] = None
    seed: Optional[int] = None  # sampling seed sent with every policy call (reproducible tests)
    max_turns: Optional[int] = None  # end the rollout after this many policy turns (status timeout: truncated)
    # token-in/token-out: every reply is one well-formed tool call (vLLM structured outputs with
    # agent_policy.tool_call_regex): a small model that seldom calls tools then acts every turn
    tool_call_grammar: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_time_fraction <= 1.0:
            raise ConfigError(f"min_time_fraction must be in [0, 1], got {self.min_time_fraction}")
        if not 0.0 < self.prune_ratio < 1.0:
            raise ConfigError(f"prune_ratio must be in (0, 1), got {self.prune_ratio}")
        if self.sandbox not in SANDBOX_KINDS:
            raise ConfigError(f"sandbox must be one of {', '.join(SANDBOX_KINDS)}, got {self.sandbox!r}")


class RolloutControl:
    """Thread-safe handle shared between the scheduler and one running rollout (agent loop in a thread)."""

    def __init__(self, *, iteration: int = 0, policy_version: int = 0, stage: int = 1) -> None:
        self._lock = threading.Lock()
        self.iteration, self.policy_version, self.stage = iteration, policy_version, stage
        self._pending: Optional[tuple[int, int, Optional[PolicyEndpoint]]] = None
        self._served: Optional[threading.Event] = None  # see carry_over
        self._stop = threading.Event()
        self.rollout_id: Optional[str] = None  # set once the rollout has started
        self.done = threading.Event()  # set when run_agent returns

    def carry_over(self, iteration: int, policy_version: int, policy: Optional[PolicyEndpoint] = None,
                   served: Optional[threading.Event] = None) -> None:
        """The iteration closed while this rollout runs: before its next policy call the agent emits
        rollout_resumed(iteration, policy_version) and later steps carry the new policy_version
        (`policy`: a new endpoint to sample from, e.g. the new checkpoint's server). Not killed.
        `served`: set once the endpoint serves `policy_version` (the scheduler trains and reloads
        meanwhile); the next policy call waits for it, so every step carries the version that made it."""
        with self._lock:
            self._pending = (iteration, policy_version, policy)
            self._served = served

    def wait_served(self) -> None:
        """Blocks until the policy taken with the last carry-over is served (or the rollout is stopped)."""
        served = self._served
        while served is not None and not served.wait(0.5) and not self.stopped:
            pass

    def stop(self) -> None:
        """End the rollout at the next turn boundary with status 'aborted'."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def _take(self) -> Optional[tuple[int, int, Optional[PolicyEndpoint]]]:
        with self._lock:
            pending, self._pending = self._pending, None
            if pending:
                self.iteration, self.policy_version = pending[0], pending[1]
            return pending


@dataclass(frozen=True)
class AgentResult:
    rollout_id: str
    status: str  # finished | timeout | error | aborted
    n_steps: int
    elapsed_s: float
    snapshot_ref: Optional[str]
    judge_request_id: Optional[str]
    error: Optional[str] = None
    n_turns: int = 0
    n_prunes: int = 0


def find_task(settings: Settings, task_id: str) -> TaskPayload:
    """The latest registered version of a task: the archive, else the tasks topic (not archived yet)."""
    from producers.tasks import latest_task

    found = latest_task(settings, task_id)
    if found is None:
        raise TerminalError(f"task {task_id!r} is not registered (run `klong tasks import DIR --split train|eval`)")
    return found[0]


class _Loop:
    """One rollout's state: the context the model sees and the recorder that keeps every step."""

    def __init__(self, rec: RolloutRecorder, sandbox, client: PolicyClient, control: RolloutControl,
                 config: AgentConfig, timeout_s: float, reading: Optional[ReadingTracker]):
        self.rec, self.sandbox, self.client, self.control, self.config = rec, sandbox, client, control, config
        self.timeout_s, self.reading = timeout_s, reading
        self.ctx = TokenContext(chat_tokenizer(config.model_dir), TOOLS) if config.model_dir else None
        self.t0 = time.monotonic()
        self.messages: list[dict] = []
        self.n_prefix = 0  # messages of the pinned prefix (kept by pruning)
        self.turns = self.prunes = 0

    def left(self) -> float:
        return self.timeout_s - (time.monotonic() - self.t0)

    @property
    def reading_done(self) -> bool:
        return self.reading is None or self.reading.done

    def observe(self, content: str, role: str, pinned: bool, tool_call_id: Optional[str] = None) -> None:
        msg = {"role": role, "content": content}
        if tool_call_id is not None:
            msg["tool_call_id"] = tool_call_id
        if self.ctx is not None:  # token-in/token-out: the ids the template adds for this message
            step = self.rec.n_steps
            start = self.ctx.context_start(step)
            ids = self.ctx.observe(msg, step_idx=step, pinned=pinned)
            self.rec.observation(content, role=role, pinned=pinned, tool_call_id=tool_call_id, token_ids=ids,
                                 context_start=start)
            return
        self.rec.observation(content, role=role, pinned=pinned, tool_call_id=tool_call_id)
        self.messages.append(msg)
        self.n_prefix += pinned

    def run(self) -> tuple[str, Optional[str]]:
        """(status, error) once the rollout ends."""
        cfg, failures, since_reading, reminded = self.config, 0, 0, 0
        while True:
            if self.control.stopped:
                return "aborted", "stopped by the operator or scheduler"
            if self.left() <= 0:
                return "timeout", None
            carried = self.control._take()
            if carried:
                self.rec.resume(carried[0], carried[1])
                self.control.wait_served()
                if self.control.stopped:
                    continue
                if carried[2] is not None:
                    self.client.close()
                    self.client = PolicyClient(carried[2], request_token_ids=cfg.request_token_ids,
                                               temperature=cfg.temperature, max_tokens=cfg.max_tokens, seed=cfg.seed,
                                               tool_call_regex=tool_call_regex(TOOLS) if cfg.tool_call_grammar else None)
            if cfg.reminder_every_turns and since_reading and since_reading % cfg.reminder_every_turns == 0 \
                    and reminded != since_reading:  # once per turn count, not again after a pruned retry
                reminded = since_reading
                self.observe(prompts.reminder(time.monotonic() - self.t0, self.timeout_s), "user", False)
            try:
                c = self.sample(not self.reading_done)
                failures = 0
            except ContextLengthExceeded as e:
                if not self.prune():
                    return "error", f"context length exceeded with only the pinned prefix left: {e}"
                continue
            except PolicyTimeout as e:
                if self.left() <= 0.5:
                    return "timeout", None
                failures += 1
                if failures >= cfg.max_transient_errors:
                    return "error", str(e)
                continue
            except TransientError as e:
                failures += 1
                if failures >= cfg.max_transient_errors:
                    return "error", str(e)
                time.sleep(min(2.0 ** failures, max(0.0, self.left())))
                continue
            pinned = not self.reading_done
            self.turns += 1
            since_reading += not pinned
            log.info("rollout %s turn %d (%.0f s left): %s", self.rec.rollout_id, self.turns, self.left(),
                     c.tool_calls[0][1] if c.tool_calls else "message")
            status = self.act(c, pinned)
            if status:
                return status, None
            if cfg.max_turns and self.turns >= cfg.max_turns:
                return "timeout", None
            if cfg.snapshot_every_turns and self.turns % cfg.snapshot_every_turns == 0:
                snapshot(self.rec, self.sandbox)

    def sample(self, pinned: bool):
        """One policy call: a Completion (chat API) or, token-in/token-out, an agent_context.Turn."""
        if self.ctx is not None:
            return self.ctx.sample(self.client, step_idx=self.rec.n_steps, pinned=pinned, timeout_s=self.left(),
                                   rollout_id=self.rec.rollout_id)
        return self.client.complete(self.messages, tools=TOOLS, timeout_s=self.left(), rollout_id=self.rec.rollout_id)

    def prune(self) -> bool:
        """Drops the oldest part of the context after the prefix (a context-length error); False: nothing left."""
        before = len(self.ctx) if self.ctx is not None else len(self.messages)
        if self.ctx is not None:
            if not self.ctx.prune(self.config.prune_ratio):
                return False
        else:
            pruned = prune(self.messages, self.n_prefix, self.config.prune_ratio)
            if pruned is None:
                return False
            self.messages = pruned
        self.prunes += 1
        log.info("rollout %s: context pruned %d -> %d %s", self.rec.rollout_id, before,
                 len(self.ctx) if self.ctx is not None else len(self.messages),
                 "tokens" if self.ctx is not None else "messages")
        return True

    def act(self, c, pinned: bool) -> Optional[str]:
        """Records the assistant step, runs its tool call, records the output. A status ends the rollout."""
        call = c.tool_calls[0] if c.tool_calls else None
        text = c.text if self.ctx is not None else c.content  # token steps: the text exactly as sampled
        self.rec.action(text, tool_call=(call[1], call[2]) if call else None, token_ids=c.token_ids,
                        logprobs=c.logprobs, pinned=pinned,
                        context_start=c.context_start if self.ctx is not None else None)
        if self.ctx is None:
            msg: dict = {"role": "assistant", "content": c.content}
            if call:  # only the call that runs is kept: every tool_call in a message needs an answer
                msg["tool_calls"] = [{"id": call[0], "type": "function",
                                      "function": {"name": call[1], "arguments": call[2]}}]
            self.messages.append(msg)
            self.n_prefix += pinned
        if c.finish_reason == "length" and not call and self.config.max_tokens is None:
            self.prune()  # cut off by the context (not by a max_tokens cap): the next call gets a pruned one
        if call is None:
            self.observe(prompts.CONTINUE, "user", pinned)
            return None
        out, ends = self.tool(call[1], call[2])
        if len(c.tool_calls) > 1:
            out = ToolOutput(out.text + f"\n\n(Only the first of {len(c.tool_calls)} function calls was run: "
                             "one function call per message.)", out.timed_out)
        self.observe(out.text, "tool", pinned, tool_call_id=call[0])
        if ends:
            return "finished"
        if out.timed_out and self.left() <= 0.5:
            return "timeout"
        return None

    def tool(self, name: str, arguments: str) -> tuple[ToolOutput, bool]:
        """(output, whether the rollout ends)."""
        elapsed = time.monotonic() - self.t0
        if name == "end_task":
            if not self.reading_done:
                return ToolOutput("end_task refused: " + self.reading.status(), error=True), False
            if elapsed < self.config.min_time_fraction * self.timeout_s:
                return ToolOutput(prompts.end_refused(elapsed, self.timeout_s, self.config.min_time_fraction),
                                  error=True), False
            try:
                message = str(parse_arguments(arguments).get("end_message", ""))
            except ToolError:
                message = ""
            return ToolOutput(f"end_task accepted. {message}".strip()), True
        if not self.reading_done and name != "read_file_chunk":
            return ToolOutput(f"{name} refused: " + self.reading.status(), error=True), False
        out = execute(self.sandbox, name, arguments, timeout_s=max(0.1, self.left()), python=self.config.python)
        if not self.reading_done:
            self.reading.record(out.chunk, self._resolve)
            out = ToolOutput(out.text + "\n\n" + self.reading.status(), out.timed_out, out.error, out.chunk)
        return out, False

    def _resolve(self, path: str) -> str:
        return os.path.normpath(os.path.join(self.sandbox.submission_dir, path))


def snapshot(rec: RolloutRecorder, sandbox) -> str:
    """Snapshots the submission (a content-addressed tar in HOME/blobs) and records the snapshot event."""
    import tempfile

    settings = rec.outbox.settings
    with tempfile.TemporaryDirectory(prefix="klong-submission-", dir=settings.home) as tmp:
        local = sandbox.local_submission(Path(tmp))
        files = [p for p in local.rglob("*") if p.is_file() and not p.is_symlink()]
        ref = store_snapshot(settings, local)
        rec.snapshot(ref, n_files=len(files), n_bytes=sum(p.stat().st_size for p in files))
    return ref


def _make_sandbox(config: AgentConfig, settings: Settings, rollout_id: str, blacklist: list[str] = ()):
    from producers.sandbox_net import allowed_hosts

    return make_sandbox(config.sandbox, Path(config.workdir) if config.workdir else settings.home / "rollouts",
                        config.limits, rollout_id=rollout_id, python=config.python, k8s_image=config.k8s_image,
                        k8s_namespace=config.k8s_namespace, allow_hosts=allowed_hosts(config.allow_hosts, blacklist))


def run_agent(outbox: Outbox, settings: Settings, task_id: str, policy: PolicyEndpoint, *, timeout_s: float,
              group_id: str, stage: int = 1, iteration: int = 0, policy_version: int = 0,
              rollout_id: Optional[str] = None, control: Optional[RolloutControl] = None,
              config: AgentConfig = AgentConfig(), judge: bool = True,
              task: Optional[TaskPayload] = None) -> AgentResult:
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
    control = control or RolloutControl(iteration=iteration, policy_version=policy_version, stage=stage)
    rec = RolloutRecorder(outbox, task_id=task_id, group_id=group_id, timeout_s=timeout_s, rollout_id=rollout_id,
                          stage=stage, iteration=iteration, policy_version=policy_version, scaffold=SCAFFOLD,
                          model=policy.model,
                          tokenizer=chat_tokenizer(config.model_dir).fingerprint if config.model_dir else "")
    control.rollout_id = rec.rollout_id
    sandbox = _make_sandbox(config, settings, rec.rollout_id, payload.blacklist)
    client = PolicyClient(policy, request_token_ids=config.request_token_ids, temperature=config.temperature,
                          max_tokens=config.max_tokens, seed=config.seed,
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
            if config.mandatory_reading else None
        loop = _Loop(rec, sandbox, client, control, config, timeout_s, reading)
        loop.observe(prompts.system_prompt(), "system", True)
        loop.observe(prompts.task_prompt(sandbox.paper_dir, sandbox.submission_dir, timeout_s, config.min_time_fraction,
                                         required, reading.status() if reading else "", "addendum.md" in files),
                     "user", True)
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
