"""Every event of the system, one typed definition each.

An event is a JSON object: the common envelope (`event_id`, `event_type`, `schema_version`,
`producer_id`, `produced_at`, `rollout_id`) plus a typed `payload`. These msgspec Structs are the
single definition from which validation (producer and sink side), the Arrow/Parquet schema
(`schemas.arrow`) and the JSON Schema (`schemas.jsonschema`) are all derived.

Token arrays (`token_ids`, `logprobs`) travel either as a JSON list of numbers (friendly for a
producer in any language) or as a base64 string of little-endian int32 / float32 (the SDK's
compact form: parsing a list of 1,000 numbers costs ~50 us in Python, base64 ~5 us). In Python the
compact form is `bytes` (msgspec does the base64): build it with `schemas.arrow.encode_array`.

    >>> ev = new_event(Step, rollout_id="r1", payload=StepPayload(step_idx=0, role="user", content="hi"))
    >>> decode(encode(ev)) == ev
    True
"""

from __future__ import annotations

import datetime as dt
import os
import re
import secrets
import time
from typing import Annotated, Any, Literal, Optional, Union

import msgspec

from schemas.errors import ValidationError

SCHEMA_VERSION = 1

Role = Literal["system", "user", "assistant", "tool"]
Split = Literal["train", "eval"]
RolloutStatus = Literal["finished", "timeout", "error", "aborted"]
Priority = Literal["eval", "train"]
RunPhase = Literal["started", "metrics", "checkpoint", "ended"]
RlPhase = Literal["started", "closed", "dataset_built", "trained", "stopped"]

# Limits every producer and the sink check alike (and the exported JSON Schemas state): an integer must fit
# the archive's int64 columns (int32 ones: MAX_INT32), and free-form JSON (a rubric, a training config)
# nests at most MAX_JSON_DEPTH arrays/objects deep (deeper documents overflow recursive encoders).
MAX_INT64 = 2**63 - 1
MAX_INT32 = 2**31 - 1
MAX_JSON_DEPTH = 64

NonNegInt = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT64)]
PosInt = Annotated[int, msgspec.Meta(ge=1, le=MAX_INT64)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
# int32 token ids: a JSON list, or base64 of little-endian int32 (shape [n_tokens]); in Python, bytes.
TokenIds = Annotated[
    Union[list[Annotated[int, msgspec.Meta(ge=0, lt=2**31)]], bytes],
    msgspec.Meta(extra={"arrow": "int32"}, description="int32 list, or base64 of little-endian int32"),
]
# float32 logprobs of the behaviour policy: a JSON list, or base64 of little-endian float32.
Logprobs = Annotated[
    Union[list[float], bytes],
    msgspec.Meta(extra={"arrow": "float32"}, description="float32 list, or base64 of little-endian float32"),
]
# Free-form JSON kept as text in Parquet (query it with DuckDB's json functions).
Json = Annotated[Any, msgspec.Meta(extra={"arrow": "json"})]
# A list of JSON objects (tool schemas), kept as JSON text in Parquet like Json.
ToolSchemas = Annotated[list[dict[str, Any]], msgspec.Meta(extra={"arrow": "json"})]


class Envelope(msgspec.Struct, frozen=True, kw_only=True, tag_field="event_type"):
    event_id: Id
    schema_version: Annotated[int, msgspec.Meta(ge=1, le=MAX_INT32)] = SCHEMA_VERSION
    producer_id: Id
    produced_at: Annotated[dt.datetime, msgspec.Meta(tz=True)]
    # Kafka key of every rollout and judge event: all events of a rollout go to one partition, in order.
    rollout_id: Optional[Id] = None

    def __post_init__(self) -> None:
        if self.schema_version > SCHEMA_VERSION:
            raise ValueError(f"schema_version {self.schema_version} is newer than this reader ({SCHEMA_VERSION})")
        if KEY_FIELD[type(self)] == "rollout_id" and self.rollout_id is None:
            raise ValueError(f"{type(self).__name__} event needs a rollout_id")


def check_json_depth(value: Any, what: str, limit: int = MAX_JSON_DEPTH) -> None:
    """ValueError when `value` nests lists/dicts more than `limit` deep (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (list, dict)):
            if depth > limit:
                raise ValueError(f"{what} nests more than {limit} levels deep")
            stack.extend((c, depth + 1) for c in (v.values() if isinstance(v, dict) else v))


# ---- payloads ---------------------------------------------------------------------------------


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


# ---- events: envelope + payload, tagged by event_type -------------------------------------------


class TaskRegistered(Envelope, frozen=True, tag="task_registered"):
    payload: TaskPayload


class RolloutStarted(Envelope, frozen=True, tag="rollout_started"):
    payload: RolloutStartedPayload


class Step(Envelope, frozen=True, tag="step"):
    payload: StepPayload


class Snapshot(Envelope, frozen=True, tag="snapshot"):
    payload: SnapshotPayload


class RolloutResumed(Envelope, frozen=True, tag="rollout_resumed"):
    payload: RolloutResumedPayload


class RolloutEnded(Envelope, frozen=True, tag="rollout_ended"):
    payload: RolloutEndedPayload


class JudgeRequested(Envelope, frozen=True, tag="judge_requested"):
    payload: JudgeRequestedPayload


class JudgeResult(Envelope, frozen=True, tag="judge_result"):
    payload: JudgeResultPayload


class TrainingRun(Envelope, frozen=True, tag="training_run"):
    payload: TrainingRunPayload


class RlIteration(Envelope, frozen=True, tag="rl_iteration"):
    payload: RlIterationPayload


EVENT_CLASSES: tuple[type[Envelope], ...] = (
    TaskRegistered, RolloutStarted, Step, Snapshot, RolloutResumed, RolloutEnded,
    JudgeRequested, JudgeResult, TrainingRun, RlIteration,
)
Event = Union[EVENT_CLASSES]  # type: ignore[valid-type]
EVENT_TYPES: dict[str, type[Envelope]] = {c.__struct_config__.tag: c for c in EVENT_CLASSES}
# Which field is the Kafka key (partitioning: per-key order is what the materializers rely on).
KEY_FIELD: dict[type, str] = {c: "rollout_id" for c in EVENT_CLASSES}
KEY_FIELD[TaskRegistered] = "task_id"
KEY_FIELD[TrainingRun] = "run_id"
KEY_FIELD[RlIteration] = "plan"  # a plan's iteration facts stay in order on one partition


_TAGS: dict[type, str] = {c: t for t, c in EVENT_TYPES.items()}


def event_type(cls_or_event: Any) -> str:
    """The event_type tag of an event or event class (a dict lookup: `__struct_config__` is slow)."""
    return _TAGS[cls_or_event if isinstance(cls_or_event, type) else type(cls_or_event)]


def key_of(ev: Envelope) -> str:
    field = KEY_FIELD[type(ev)]
    return ev.rollout_id if field == "rollout_id" else getattr(ev.payload, field)


# ---- ids, encode, decode ------------------------------------------------------------------------


def uuid7() -> str:
    """A UUIDv7: 48-bit unix-ms timestamp, then random bits; sorts by creation time."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64 | 0b10 << 62 | rand & ((1 << 62) - 1)
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_PATH_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+@=-]{0,199}")


def path_safe_id(value: str, what: str = "id") -> str:
    """`value` when it can name a directory (letters, digits, `._:+@=-`, no `..`, at most 200
    characters), else a ValidationError: an id from a user or an event never leaves its parent dir."""
    if not isinstance(value, str) or not _PATH_ID.fullmatch(value) or ".." in value:
        raise ValidationError(f"{what} {value!r} cannot name a directory: use letters, digits and ._:+@=- "
                              "(no '/', no '..', at most 200 characters)")
    return value


PRODUCER_ID = f"{os.uname().nodename}-{os.getpid()}-{secrets.token_hex(3)}"


def new_event(cls: type[Envelope], *, payload: Any, rollout_id: Optional[str] = None,
              producer_id: str = PRODUCER_ID, event_id: Optional[str] = None,
              produced_at: Optional[dt.datetime] = None) -> Envelope:
    """Builds a validated event with a fresh UUIDv7 and the current UTC time."""
    try:
        ev = cls(event_id=event_id or uuid7(), producer_id=producer_id,
                 produced_at=produced_at or dt.datetime.now(dt.timezone.utc),
                 rollout_id=rollout_id, payload=payload)
        # Constructors do not check constraints (ge=, Literal); a round trip through the decoder does.
        return _DECODER.decode(_ENCODER.encode(ev))
    except (msgspec.ValidationError, ValueError) as e:
        raise ValidationError(f"invalid {event_type(cls)} event: {e}") from e
    except RecursionError as e:
        raise ValidationError(f"invalid {event_type(cls)} event: nested more than {MAX_JSON_DEPTH} levels deep") from e


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(Event)


def encode(ev: Envelope) -> bytes:
    return _ENCODER.encode(ev)


def decode(data: bytes) -> Envelope:
    """JSON bytes -> typed event. Raises ValidationError naming the field at fault."""
    try:
        return _DECODER.decode(data)
    except msgspec.ValidationError as e:
        raise ValidationError(str(e)) from e
    except msgspec.DecodeError as e:
        raise ValidationError(f"not a JSON event: {e}") from e
    except UnicodeDecodeError as e:
        raise ValidationError(f"not valid UTF-8: {e}") from e
    except RecursionError as e:
        raise ValidationError(f"nested more than {MAX_JSON_DEPTH} levels deep ({e})") from e
