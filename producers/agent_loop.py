"""The agent loop of one rollout: sample the policy, record the step, dispatch its tool call, observe.

    >>> loop = AgentLoop(rec, sandbox, client, control, config, timeout_s, reading)
    >>> loop.observe(prompts.system_prompt(), "system", True)
    >>> status, error = loop.run()   # finished | timeout | error | aborted

`run` turns until a status: it takes carry-overs and stops from `RolloutControl`, adds time reminders,
prunes the model's context on a context-length error, retries transient policy failures. `act` records
the assistant step and runs its first tool call through `tool` (mandatory paper reading and the
end_task rules, then `producers.agent_tools.execute` in the sandbox); `observe` records each observation
(token-in/token-out: the ids the chat template adds, `producers.agent_context`). `snapshot` stores the
submission directory and records the snapshot event. Orchestration is in `producers.agent.run_agent`.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Optional

from producers import agent_prompts as prompts
from producers.agent_config import AgentConfig, RolloutControl
from producers.agent_context import TokenContext, chat_tokenizer
from producers.agent_policy import ContextLengthExceeded, PolicyClient, PolicyTimeout, prune, tool_call_regex
from producers.agent_tools import TOOLS, ReadingTracker, ToolOutput, execute, parse_arguments, ToolError
from producers.judge_requests import store_snapshot
from producers.recorder import RolloutRecorder
from schemas.errors import TransientError

log = logging.getLogger("klong.agent")


class AgentLoop:
    """One rollout's state: the context the model sees and the recorder that keeps every step."""

    def __init__(self, rec: RolloutRecorder, sandbox, client: PolicyClient, control: RolloutControl,
                 config: AgentConfig, timeout_s: float, reading: Optional[ReadingTracker]):
        self.rec, self.sandbox, self.client, self.control, self.config = rec, sandbox, client, control, config
        self.timeout_s, self.reading = timeout_s, reading
        self.ctx = TokenContext(chat_tokenizer(config.model_dir), TOOLS, limit=config.context_limit) \
            if config.model_dir else None
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
                                               temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                               max_tokens=cfg.max_tokens, seed=cfg.seed,
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
        if self.ctx is not None:  # token-in/token-out: header ++ sampled ++ closing markup (agent_context)
            sampled = (c.n_generation_prompt, c.n_sampled)
        else:  # the chat API returns the sampled ids alone (or none: a text-only step)
            sampled = (0, len(c.token_ids)) if c.token_ids is not None else (None, None)
        cfg = self.config
        self.rec.action(text, tool_call=(call[1], call[2]) if call else None, token_ids=c.token_ids,
                        logprobs=c.logprobs, pinned=pinned,
                        context_start=c.context_start if self.ctx is not None else None,
                        n_generation_prompt=sampled[0], n_sampled=sampled[1], finish_reason=c.finish_reason or None,
                        temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
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
