"""The rollout fleet's messages: requests the scheduler publishes, results workers publish, commands.

    topic <prefix>.rollout.requests   RolloutRequest   key rollout_id   consumed by the worker group
    topic <prefix>.rollout.results    RolloutResult    key rollout_id   read by the scheduler that asked
    topic <prefix>.rollout.control    RolloutCommand   key rollout_id   read in full by every worker

    >>> data = encode_message(RolloutRequest(rollout_id=rid, task_id="fre", group_id="g", timeout_s=60,
    ...                                      base_url="http://gpu-1:8000/v1", model="klong"))
    >>> decode_message(data, RolloutRequest)

These are not events: they steer work, the event log records what happened (the archive sink never reads
these topics). JSON like events, so a worker in any language can serve the same requests. A request
carries everything a worker needs to run the rollout (task, group, stage, iteration, policy version and
endpoint, limits as the agent config); the resume point is not in it: a worker reads it from the log
(the rollout's recorded steps), so a request delivered again after a worker died resumes where the log
stops. The policy's API key never travels: `api_key_env` names the variable each worker reads.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, TypeVar

import msgspec

from schemas.errors import ValidationError
from schemas.events import Id, NonNegFloat, NonNegInt, PosInt

FLEET_SCHEMA_VERSION = 1
T = TypeVar("T")


class RolloutRequest(msgspec.Struct, frozen=True, kw_only=True):
    rollout_id: Id
    task_id: Id
    group_id: Id
    stage: PosInt = 1
    iteration: NonNegInt = 0
    policy_version: NonNegInt = 0
    timeout_s: Annotated[float, msgspec.Meta(gt=0)]
    base_url: str  # the policy endpoint (OpenAI-compatible)
    model: str
    api_key_env: Optional[str] = None  # the variable holding the policy's API key on the worker
    config: dict[str, Any] = {}  # producers.agent_config.AgentConfig fields (limits, sandbox, prompt...)
    judge: bool = True
    run_id: str = ""  # the scheduler run that asked (its results consumer filters nothing by it: for logs)
    schema_version: PosInt = FLEET_SCHEMA_VERSION


class RolloutResult(msgspec.Struct, frozen=True, kw_only=True):
    """A rollout ended (as recorded in the log); at-least-once: the scheduler keeps the first per rollout."""

    rollout_id: Id
    status: Literal["finished", "timeout", "error", "aborted"]
    n_steps: NonNegInt
    elapsed_s: NonNegFloat = 0.0
    snapshot_ref: Optional[str] = None
    judge_request_id: Optional[str] = None
    error: Optional[str] = None
    n_turns: NonNegInt = 0
    worker: str = ""
    resumed: bool = False  # this worker continued it from the log (its first worker was lost)
    iteration: NonNegInt = 0  # the iteration it ended in (a carry-over taken before the end counts)
    recorded: bool = True  # False: it failed before anything was recorded (unknown task, missing API key)
    schema_version: PosInt = FLEET_SCHEMA_VERSION


class RolloutCommand(msgspec.Struct, frozen=True, kw_only=True):
    """What the scheduler tells a running (or not yet started) rollout, wherever it runs.

    carry_over: continue in `iteration` under `policy_version` (rollout_resumed at the next turn); with
    `wait_served` the next policy call waits for a `served` command of that policy_version.
    stop: end at the next turn boundary (aborted). served: `policy_version` is now served (rollout_id "*")."""

    rollout_id: Id
    action: Literal["carry_over", "stop", "served"]
    iteration: NonNegInt = 0
    policy_version: NonNegInt = 0
    wait_served: bool = False
    run_id: str = ""  # the scheduler run: "served" of one run never releases another run's carry-overs
    schema_version: PosInt = FLEET_SCHEMA_VERSION


_ENCODER = msgspec.json.Encoder()
_DECODERS: dict[type, msgspec.json.Decoder] = {}


def encode_message(msg: msgspec.Struct) -> bytes:
    return _ENCODER.encode(msg)


def decode_message(data: bytes, cls: type[T]) -> T:
    """JSON bytes -> `cls`. Raises ValidationError naming the message type and the field at fault."""
    dec = _DECODERS.setdefault(cls, msgspec.json.Decoder(cls))
    try:
        msg = dec.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError) as e:
        raise ValidationError(f"not a valid {cls.__name__}: {e}") from e
    if msg.schema_version > FLEET_SCHEMA_VERSION:
        raise ValidationError(f"{cls.__name__} schema_version {msg.schema_version} is newer than this worker "
                              f"({FLEET_SCHEMA_VERSION}): upgrade the workers")
    return msg
