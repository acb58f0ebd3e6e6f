"""The events: the common envelope plus a typed payload, tagged by `event_type`, and each one's Kafka key.

    event_type(Step)          # "step"
    key_of(ev)                # the Kafka key: rollout_id, or the task_id / run_id / plan of the few others

Every rollout and judge event is keyed by its rollout_id, so all events of a rollout go to one partition,
in order: what the materializers rely on.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Optional, Union

import msgspec

from schemas.fields import MAX_INT32, SCHEMA_VERSION, Id
from schemas.payloads import (JudgeRequestedPayload, JudgeResultPayload, RlIterationPayload, RolloutEndedPayload,
                              RolloutResumedPayload, RolloutStartedPayload, SnapshotPayload, StepPayload,
                              TaskPayload, TrainingRunPayload)


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
