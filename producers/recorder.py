"""The rollout recorder: the SDK an agent scaffold calls to record one rollout as events.

    with Outbox(settings) as outbox:
        with RolloutRecorder(outbox, task_id="paper-1", group_id="g-7", timeout_s=7200) as rec:
            rec.observation(system_prompt, role="system", pinned=True)
            rec.observation(task_text, role="user", pinned=True)
            rec.action(reply, tool_call=("bash", '{"cmd": "ls"}'), token_ids=ids, logprobs=lps)
            rec.observation(tool_output, token_ids=out_ids, tool_call_id="call-1")
            rec.snapshot("sha256:...")       # submission state to be judged
        # leaving the block ends the rollout: "finished", or "error" if an exception escaped

Entering emits `rollout_started`; every step gets the next dense `step_idx` (returned), its token
arrays are sent in the compact base64 form, and steps over the message size limit go through the
claim check (`schemas.claimcheck`) before they reach the outbox. A partial rollout carried into a new
iteration continues with `RolloutRecorder.from_existing(...)` (emits `rollout_resumed` and keeps
counting step_idx where it stopped) or, in the same process, `rec.resume(iteration, policy_version)`.
Other producers (task registry, judge) send single events with `publish(outbox, event)`.
"""

from __future__ import annotations

import json
import time
from typing import Any, Optional, Sequence, Union

import numpy as np

from producers.outbox import Outbox
from schemas.arrow import encode_array
from schemas.claimcheck import BlobStore, claim_check
from schemas.errors import ValidationError
from schemas.events import (Envelope, RolloutEnded, RolloutEndedPayload, RolloutResumed, RolloutResumedPayload,
                            RolloutStarted, RolloutStartedPayload, RolloutStatus, Snapshot, SnapshotPayload, Step,
                            StepPayload, ToolCall, new_event, uuid7)

ToolCallLike = Union[ToolCall, tuple[str, Any]]
ArrayLike = Union[Sequence[int], Sequence[float], np.ndarray]


def publish(outbox: Outbox, ev: Envelope, blob_store: Optional[BlobStore] = None) -> None:
    """Sends one event through the outbox (a step over the size limit goes by claim check)."""
    store = blob_store or BlobStore(outbox.settings.blob_dir)
    outbox.put(claim_check(ev, store))


def _tokens(values: Optional[ArrayLike], what: str) -> Optional[np.ndarray]:
    """List / numpy -> int32 array [n_tokens], checked: ids must fit int32 and be >= 0."""
    if values is None:
        return None
    arr = np.asarray(values)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ValidationError(f"{what}: token_ids must be a flat list of integers, got shape {arr.shape} {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= 2**31):
        raise ValidationError(f"{what}: token_ids must be in [0, 2**31), got range [{arr.min()}, {arr.max()}]")
    return arr


def _logprobs(values: Optional[ArrayLike], n_tokens: Optional[int], what: str) -> Optional[np.ndarray]:
    if values is None:
        return None
    if n_tokens is None:
        raise ValidationError(f"{what}: logprobs need the token_ids they belong to")
    arr = np.asarray(values, dtype=np.float32)
    if arr.ndim != 1 or len(arr) != n_tokens:
        raise ValidationError(f"{what}: {arr.size} logprobs for {n_tokens} token_ids (need one per token)")
    if np.isinf(arr).any() or (arr > 0).any():  # NaN: a token the template added, not sampled (no logprob)
        raise ValidationError(f"{what}: logprobs must be <= 0 (NaN for tokens the policy did not sample)")
    return arr


def _tool_call(tc: Optional[ToolCallLike], what: str) -> Optional[ToolCall]:
    if tc is None or isinstance(tc, ToolCall):
        return tc
    if isinstance(tc, tuple) and len(tc) == 2 and isinstance(tc[0], str):
        name, args = tc
        return ToolCall(name=name, arguments=args if isinstance(args, str) else json.dumps(args))
    raise ValidationError(f"{what}: tool_call must be a ToolCall or a (name, arguments) pair, got {tc!r}")


class RolloutRecorder:
    def __init__(self, outbox: Outbox, *, task_id: str, group_id: str, timeout_s: float,
                 rollout_id: Optional[str] = None, stage: int = 1, iteration: int = 0, policy_version: int = 0,
                 scaffold: str = "", model: str = "", blob_store: Optional[BlobStore] = None,
                 next_step_idx: Optional[int] = None, elapsed_offset_s: float = 0.0, tokenizer: str = "") -> None:
        """`next_step_idx` set: the rollout already exists (started earlier, maybe elsewhere): entering
        emits `rollout_resumed` and numbering continues there. `elapsed_offset_s`: time already used."""
        self.outbox, self.task_id, self.group_id, self.timeout_s = outbox, task_id, group_id, timeout_s
        self.rollout_id = rollout_id or uuid7()
        self.stage, self.iteration, self.policy_version = stage, iteration, policy_version
        self.scaffold, self.model = scaffold, model
        self.tokenizer = tokenizer  # fingerprint of the ids recorded (core.chat), "" unknown
        self.blob_store = blob_store or BlobStore(outbox.settings.blob_dir)
        self._existing = next_step_idx is not None
        self._next = next_step_idx or 0
        self._offset = elapsed_offset_s
        self._t0: Optional[float] = None
        self._ended = False

    @classmethod
    def from_existing(cls, outbox: Outbox, *, rollout_id: str, next_step_idx: int, iteration: int,
                      policy_version: int, task_id: str, group_id: str, timeout_s: float,
                      elapsed_offset_s: float = 0.0, **kw: Any) -> "RolloutRecorder":
        """A partial rollout carried into a new iteration (possibly with a new policy_version)."""
        return cls(outbox, rollout_id=rollout_id, next_step_idx=next_step_idx, iteration=iteration,
                   policy_version=policy_version, task_id=task_id, group_id=group_id, timeout_s=timeout_s,
                   elapsed_offset_s=elapsed_offset_s, **kw)

    # ---- lifecycle -----------------------------------------------------------------------------

    @property
    def n_steps(self) -> int:
        return self._next

    @property
    def ended(self) -> bool:
        return self._ended

    def start(self) -> None:
        """Emits rollout_started (or rollout_resumed for an existing rollout); `__enter__` calls it."""
        if self._t0 is not None:
            return
        self._t0 = time.monotonic()
        if self._existing:
            self._emit(RolloutResumed, RolloutResumedPayload(
                iteration=self.iteration, policy_version=self.policy_version, stage=self.stage,
                next_step_idx=self._next))
        else:
            self._emit(RolloutStarted, RolloutStartedPayload(
                task_id=self.task_id, group_id=self.group_id, stage=self.stage, iteration=self.iteration,
                timeout_s=self.timeout_s, policy_version=self.policy_version, scaffold=self.scaffold,
                tokenizer=self.tokenizer,
                model=self.model))

    def resume(self, iteration: int, policy_version: int, stage: Optional[int] = None) -> None:
        """The rollout continues in a new iteration (partial rollout), maybe under a new policy."""
        self._check_open("resume")
        self.iteration, self.policy_version, self.stage = iteration, policy_version, stage or self.stage
        self._emit(RolloutResumed, RolloutResumedPayload(
            iteration=iteration, policy_version=policy_version, stage=self.stage, next_step_idx=self._next))

    def end(self, status: RolloutStatus = "finished", error: Optional[str] = None,
            elapsed_s: Optional[float] = None) -> None:
        self._check_open("end")
        self._emit(RolloutEnded, RolloutEndedPayload(
            status=status, n_steps=self._next, elapsed_s=self._elapsed(elapsed_s), error=error))
        self._ended = True

    def __enter__(self) -> "RolloutRecorder":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._ended or self._t0 is None:
            return
        if exc_type is None:
            self.end("finished")
        else:  # Ctrl-C / SystemExit is the operator stopping it; anything else is a scaffold error
            status = "error" if issubclass(exc_type, Exception) else "aborted"
            self.end(status, error=f"{exc_type.__name__}: {exc}"[:2000])

    # ---- steps ---------------------------------------------------------------------------------

    def observation(self, content: str, *, role: str = "tool", token_ids: Optional[ArrayLike] = None,
                    pinned: bool = False, tool_call_id: Optional[str] = None,
                    elapsed_s: Optional[float] = None, logprobs: None = None,
                    context_start: Optional[int] = None) -> int:
        """A system prompt, user message or tool output. Returns its step_idx. `context_start`: see action()."""
        if role not in ("tool", "user", "system"):
            raise ValidationError(f"observation role must be tool, user or system, not {role!r} "
                                  "(assistant output is recorded with action())")
        what = f"rollout {self.rollout_id} step {self._next} ({role})"
        if logprobs is not None:  # accepted only to say why: the policy did not sample these tokens
            raise ValidationError(f"{what}: logprobs belong on assistant steps (action()), not on {role} steps")
        return self._step(what, role=role, content=content, token_ids=_tokens(token_ids, what), pinned=pinned,
                          tool_call_id=tool_call_id, elapsed_s=elapsed_s, context_start=context_start)

    def action(self, content: str, *, tool_call: Optional[ToolCallLike] = None,
               token_ids: Optional[ArrayLike] = None, logprobs: Optional[ArrayLike] = None,
               pinned: bool = False, elapsed_s: Optional[float] = None, context_start: Optional[int] = None,
               n_generation_prompt: Optional[int] = None, n_sampled: Optional[int] = None,
               finish_reason: Optional[str] = None, temperature: Optional[float] = None,
               top_p: Optional[float] = None, top_k: Optional[int] = None) -> int:
        """An assistant turn (text and/or a tool call) with its behaviour-policy logprobs (NaN for ids the chat
        template added around the sampled ones). Returns step_idx. `context_start`: the model was given steps
        [0, P) ++ [context_start, this step) (P: the pinned prefix), for token-in/token-out scaffolds.
        `token_ids[n_generation_prompt : n_generation_prompt + n_sampled]` are the ids the policy sampled (the
        rest is chat-template markup: no loss); `finish_reason`, `temperature`, `top_p`, `top_k`: how it was
        sampled (the trainer takes log-probs at that temperature)."""
        what = f"rollout {self.rollout_id} step {self._next} (assistant)"
        tokens = _tokens(token_ids, what)
        lps = _logprobs(logprobs, None if tokens is None else len(tokens), what)
        if (n_generation_prompt is None) != (n_sampled is None):
            raise ValidationError(f"{what}: give n_generation_prompt and n_sampled together, or neither")
        if n_sampled is not None and (tokens is None or n_generation_prompt < 0 or n_sampled < 0
                                      or n_generation_prompt + n_sampled > len(tokens)):
            raise ValidationError(f"{what}: n_generation_prompt={n_generation_prompt} + n_sampled={n_sampled} must "
                                  f"lie within the step's {0 if tokens is None else len(tokens)} token_ids")
        return self._step(what, role="assistant", content=content, token_ids=tokens, logprobs=lps, pinned=pinned,
                          tool_call=_tool_call(tool_call, what), elapsed_s=elapsed_s, context_start=context_start,
                          n_generation_prompt=n_generation_prompt, n_sampled=n_sampled, finish_reason=finish_reason,
                          temperature=None if temperature is None else float(temperature),
                          top_p=None if top_p is None else float(top_p), top_k=top_k)

    def snapshot(self, ref: str, n_files: int = 0, n_bytes: int = 0) -> int:
        """The submission state after the last step, to be judged. Returns that step_idx."""
        self._check_open("snapshot")
        step_idx = max(self._next - 1, 0)
        self._emit(Snapshot, SnapshotPayload(step_idx=step_idx, ref=ref, n_files=n_files, n_bytes=n_bytes))
        return step_idx

    def request_judgment(self, step_idx: Optional[int] = None, priority: str = "train",
                         snapshot_ref: Optional[str] = None, request_id: Optional[str] = None) -> str:
        """Asks the judge to score the submission at `step_idx` (default: the last step); eval requests
        jump the queue. Returns the request_id (the judge's idempotency key)."""
        from producers.judge_requests import request_judgment

        return request_judgment(self.outbox, rollout_id=self.rollout_id, task_id=self.task_id,
                                step_idx=max(self._next - 1, 0) if step_idx is None else step_idx,
                                priority=priority, snapshot_ref=snapshot_ref, request_id=request_id)

    def _step(self, what: str, *, token_ids: Optional[np.ndarray], logprobs: Optional[np.ndarray] = None,
              elapsed_s: Optional[float], **fields: Any) -> int:
        self._check_open("record a step")
        if not isinstance(fields["content"], str):
            raise ValidationError(f"{what}: content must be a str, got {type(fields['content']).__name__}")
        step_idx = self._next
        self._emit(Step, StepPayload(
            step_idx=step_idx, policy_version=self.policy_version, elapsed_s=self._elapsed(elapsed_s),
            token_ids=None if token_ids is None else encode_array(token_ids, "int32"),
            logprobs=None if logprobs is None else encode_array(logprobs, "float32"), **fields))
        self._next += 1  # only once the step is safely in the outbox: a failed put leaves no gap
        return step_idx

    # ---- helpers -------------------------------------------------------------------------------

    def _elapsed(self, given: Optional[float]) -> float:
        if given is not None:
            return float(given)
        return self._offset + (time.monotonic() - self._t0 if self._t0 is not None else 0.0)

    def _check_open(self, doing: str) -> None:
        if self._t0 is None:
            self.start()  # used without `with`: the first call starts the rollout
        if self._ended:
            raise ValidationError(f"cannot {doing}: rollout {self.rollout_id} has already ended")

    def _emit(self, cls: type[Envelope], payload: Any) -> None:
        publish(self.outbox, new_event(cls, rollout_id=self.rollout_id, payload=payload), self.blob_store)
