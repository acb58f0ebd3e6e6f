"""The typed payload of every event: what a task, a rollout step, a judge result or a training run says.

    StepPayload(step_idx=0, role="user", content="hi")    # constructors do not check; schemas.codec.new_event does

Each payload is a frozen msgspec Struct; schemas.events pairs it with the common envelope under an
`event_type` tag. Fields added later have defaults, so archives written before them still decode.
"""

from __future__ import annotations

from typing import Annotated, Optional

import msgspec

from schemas.fields import (MAX_INT32, Id, Json, Logprobs, NonNegFloat, NonNegInt, PosInt, Priority,
                            RlPhase, Role, RolloutStatus, RunPhase, Split, TokenIds, ToolSchemas, check_json_depth)


class TaskPayload(msgspec.Struct, frozen=True, kw_only=True):
    task_id: Id
    title: str
    split: Split
    paper_md: Optional[str] = None  # inline paper markdown, or
    paper_ref: Optional[str] = None  # a content-addressed reference ("sha256:...")
    addendum: str = ""
    judge_addendum: str = ""
    rubric: Json = None  # PaperBench rubric.json tree: id, requirements, weight, sub_tasks, task_category
    blacklist: list[str] = []
    content_hash: str = ""  # sha256 over the task's content: a changed task is a new task version

    def __post_init__(self) -> None:
        check_json_depth(self.rubric, "rubric")


class RolloutStartedPayload(msgspec.Struct, frozen=True, kw_only=True):
    task_id: Id
    group_id: Id  # the n rollouts of one sample share it
    stage: PosInt = 1
    iteration: NonNegInt = 0
    timeout_s: Annotated[float, msgspec.Meta(gt=0)]
    policy_version: NonNegInt = 0
    scaffold: str = ""
    model: str = ""
    # Fingerprint of the vocabulary + chat template the steps' token_ids come from (core.chat; "bytes"
    # for the byte tokenizer; "" unknown): a dataset never mixes rollouts of two fingerprints.
    tokenizer: str = ""
    # The tool (function) schemas the agent was given, OpenAI-style (`{"type": "function", "function": {"name",
    # "description", "parameters"}}`): a dataset build that renders text-only steps with a chat template passes
    # them as its `tools` (the `<tools>` block). None: not recorded (archives from before this field read NULL).
    tools: Optional[ToolSchemas] = None


class ToolCall(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    name: str
    arguments: str = ""  # JSON text, as OpenAI-compatible APIs return it
    id: Optional[str] = None


class StepPayload(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One turn of a rollout. On the wire, fields left at their defaults are omitted (decoding restores them): a
    tool step would otherwise carry ~250 bytes of nulls of the assistant-only fields."""
    step_idx: NonNegInt  # 0-based, dense within a rollout
    role: Role
    content: str = ""
    tool_call: Optional[ToolCall] = None  # assistant steps
    tool_call_id: Optional[str] = None  # tool steps: which call this output answers
    token_ids: Optional[TokenIds] = None  # absent for text-only imports: tokenized at materialization
    logprobs: Optional[Logprobs] = None  # behaviour policy, assistant steps only, one per token
    pinned: bool = False
    elapsed_s: NonNegFloat = 0.0
    policy_version: NonNegInt = 0
    # Token-in/token-out runners: the model was given steps [0, P) ++ [context_start, step_idx) when it
    # produced this step (P: the pinned prefix); None: unknown (text-only or an older recorder). A prune
    # moves it forward. logprobs may end in NaN for tokens the template adds after the sampled ones.
    context_start: Optional[NonNegInt] = None
    # Claim check: content/token_ids/logprobs live in this content-addressed blob (see schemas.claimcheck).
    blob_ref: Optional[str] = None
    # Assistant steps: which of token_ids the policy sampled. token_ids = the generation prompt the template
    # opened the turn with (`n_generation_prompt` ids, `<|im_start|>assistant\n`), the `n_sampled` sampled ids
    # (the end-of-turn id included when the model stopped), then the ids the template closes the turn with (the
    # rest: `\n` after a sampled `<|im_end|>`, `<|im_end|>\n` after a cut sample). Only sampled ids carry loss.
    # None (older events, imports): the dataset builder infers the range (consumers.sampled).
    n_generation_prompt: Optional[NonNegInt] = None
    n_sampled: Optional[NonNegInt] = None
    # Assistant steps: why sampling ended (stop: end-of-turn id or stop string; length: cut by max_tokens or
    # the context) and the sampling parameters. temperature None: unknown, trained as 1.0 (what the OpenAI API
    # and vLLM default to); 0 is greedy. top_p 1.0 and top_k -1 (or 0): off; None: unknown, taken as off.
    finish_reason: Optional[Annotated[str, msgspec.Meta(max_length=64)]] = None
    temperature: Optional[NonNegFloat] = None
    top_p: Optional[Annotated[float, msgspec.Meta(gt=0, le=1)]] = None
    top_k: Optional[Annotated[int, msgspec.Meta(ge=-1, le=MAX_INT32)]] = None

    def __post_init__(self) -> None:
        if self.logprobs is not None and self.role != "assistant":
            raise ValueError(f"logprobs are only allowed on assistant steps, not on role {self.role!r}")
        if self.tool_call is not None and self.role != "assistant":
            raise ValueError(f"tool_call is only allowed on assistant steps, not on role {self.role!r}")
        sampling = ("n_generation_prompt", "n_sampled", "finish_reason", "temperature", "top_p", "top_k")
        given = [f for f in sampling if getattr(self, f) is not None]
        if given and self.role != "assistant":
            raise ValueError(f"{given[0]} is only allowed on assistant steps, not on role {self.role!r}")
        if (self.n_generation_prompt is None) != (self.n_sampled is None):
            raise ValueError("n_generation_prompt and n_sampled go together (which token_ids were sampled)")
        if self.n_sampled is not None and self.blob_ref is None:  # claim-checked: the ids are in the blob
            if self.token_ids is None:
                raise ValueError("n_generation_prompt/n_sampled count token_ids: a step without token_ids has none")
            n = len(self.token_ids) // 4 if isinstance(self.token_ids, bytes) else len(self.token_ids)
            if self.n_generation_prompt + self.n_sampled > n:
                raise ValueError(f"n_generation_prompt + n_sampled = {self.n_generation_prompt + self.n_sampled} "
                                 f"exceeds the step's {n} token_ids")


class SnapshotPayload(msgspec.Struct, frozen=True, kw_only=True):
    step_idx: NonNegInt
    ref: str  # reference of the submission state: "sha256:..." blob, or a directory under the data home
    n_files: NonNegInt = 0
    n_bytes: NonNegInt = 0


class RolloutResumedPayload(msgspec.Struct, frozen=True, kw_only=True):
    iteration: NonNegInt
    policy_version: NonNegInt
    stage: PosInt = 1
    next_step_idx: NonNegInt = 0


class RolloutEndedPayload(msgspec.Struct, frozen=True, kw_only=True):
    status: RolloutStatus
    n_steps: NonNegInt
    elapsed_s: NonNegFloat = 0.0
    error: Optional[str] = None


class JudgeRequestedPayload(msgspec.Struct, frozen=True, kw_only=True):
    request_id: Id
    step_idx: NonNegInt
    task_id: Id
    priority: Priority
    snapshot_ref: Optional[str] = None


class LeafScore(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    score: Annotated[float, msgspec.Meta(ge=0, le=1)]
    valid: bool = True
    explanation: str = ""


class JudgeResultPayload(msgspec.Struct, frozen=True, kw_only=True):
    request_id: Id
    step_idx: NonNegInt
    task_id: Optional[str] = None
    judge_model: str
    score: Optional[Annotated[float, msgspec.Meta(ge=0, le=1)]] = None  # Q, the rubric root score
    valid: bool
    leaf_scores: list[LeafScore] = []
    n_invalid_leaves: NonNegInt = 0
    error: Optional[str] = None
    prompt_tokens: NonNegInt = 0
    completion_tokens: NonNegInt = 0
    latency_s: NonNegFloat = 0.0

    def __post_init__(self) -> None:
        if self.valid and self.score is None:
            raise ValueError("a valid judge result needs a score")


class TrainingRunPayload(msgspec.Struct, frozen=True, kw_only=True):
    run_id: Id
    phase: RunPhase
    dataset: Optional[str] = None  # NAME@N
    dataset_hash: Optional[str] = None
    mode: Optional[str] = None  # sft | rl
    policy_version_in: Optional[NonNegInt] = None
    policy_version_out: Optional[NonNegInt] = None
    step: Optional[NonNegInt] = None
    metrics: dict[str, float] = {}
    config: Json = None
    checkpoint: Optional[str] = None

    def __post_init__(self) -> None:
        check_json_depth(self.config, "config")


class RlIterationPayload(msgspec.Struct, frozen=True, kw_only=True):
    """One fact of the progressive-RL scheduler (`rl.scheduler`) about one iteration of a plan run.

    started: the iteration's new rollouts (`rollouts`, planned ids) and those carried in from the previous
    iteration (`carried_in`). closed: the close rule fired; `carried_out` keep running into the next
    iteration, `not_started` were still queued for a slot and were never started; `ended` counts by status
    the rollouts that ended in this iteration; `rolling_s` = start -> close. dataset_built: the iteration's
    RL dataset version (`dataset` NAME@N), after `judge_wait_s` waiting for the archive and the judge.
    trained: the plan's train step (trainer config or shell hook) finished on that version (`train_s`); with
    a managed policy server, `checkpoint` is what the next iteration is served from (`reload_method` reload |
    restart | skipped, `reload_s`), `train_run` the training run id.
    stopped: the run was interrupted (Ctrl-C) in this iteration; running rollouts were aborted."""
    plan: Id
    run_id: Id  # one `klong rl run` of the plan
    phase: RlPhase
    stage: PosInt
    iteration: NonNegInt  # global across stages, 1-based
    policy_version: NonNegInt  # the policy that acts in this iteration; the dataset's trainer_policy_version
    timeout_s: NonNegFloat = 0.0  # the stage's rollout timeout T(m)
    rollouts: list[str] = []
    carried_in: list[str] = []
    carried_out: list[str] = []
    not_started: list[str] = []
    ended: dict[str, NonNegInt] = {}  # status -> rollouts that ended in this iteration
    judged: NonNegInt = 0  # ended rollouts whose judge result is archived
    judge_missing: NonNegInt = 0  # judge requests still without a result when the wait timed out
    rolling_s: NonNegFloat = 0.0
    judge_wait_s: NonNegFloat = 0.0
    build_s: NonNegFloat = 0.0
    train_s: NonNegFloat = 0.0
    dataset: Optional[str] = None  # NAME@N
    dataset_hash: Optional[str] = None
    n_samples: Optional[NonNegInt] = None
    error: Optional[str] = None
    checkpoint: Optional[str] = None  # trained: the new policy's weights (a transformers directory)
    train_run: Optional[str] = None
    reload_s: NonNegFloat = 0.0
    reload_method: Optional[str] = None
