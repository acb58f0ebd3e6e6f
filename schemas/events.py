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
The parts: schemas.fields (types, vocabularies, limits), schemas.payloads (the payloads), schemas.envelope
(the envelope, the event classes, their tags and Kafka keys), schemas.codec (ids, new_event, encode,
decode). This module re-exports all of them: `from schemas.events import ...` is how the system imports them.
"""

from schemas.codec import PRODUCER_ID, decode, encode, new_event, path_safe_id, uuid7
from schemas.envelope import (EVENT_CLASSES, EVENT_TYPES, KEY_FIELD, Envelope, Event, JudgeRequested, JudgeResult,
                              RlIteration, RolloutEnded, RolloutResumed, RolloutStarted, Snapshot, Step,
                              TaskRegistered, TrainingRun, event_type, key_of)
from schemas.fields import (MAX_INT32, MAX_INT64, MAX_JSON_DEPTH, SCHEMA_VERSION, Id, Json, Logprobs, NonNegFloat,
                            NonNegInt, PosInt, Priority, RlPhase, Role, RolloutStatus, RunPhase, Split, TokenIds,
                            ToolSchemas, check_json_depth)
from schemas.payloads import (JudgeRequestedPayload, JudgeResultPayload, LeafScore, RlIterationPayload,
                              RolloutEndedPayload, RolloutResumedPayload, RolloutStartedPayload, SnapshotPayload,
                              StepPayload, TaskPayload, ToolCall, TrainingRunPayload)

__all__ = [
    "EVENT_CLASSES", "EVENT_TYPES", "KEY_FIELD", "MAX_INT32", "MAX_INT64", "MAX_JSON_DEPTH", "PRODUCER_ID",
    "SCHEMA_VERSION", "Envelope", "Event", "Id", "Json", "JudgeRequested", "JudgeRequestedPayload", "JudgeResult",
    "JudgeResultPayload", "LeafScore", "Logprobs", "NonNegFloat", "NonNegInt", "PosInt", "Priority", "RlIteration",
    "RlIterationPayload", "RlPhase", "Role", "RolloutEnded", "RolloutEndedPayload", "RolloutResumed",
    "RolloutResumedPayload", "RolloutStarted", "RolloutStartedPayload", "RolloutStatus", "RunPhase", "Snapshot",
    "SnapshotPayload", "Split", "Step", "StepPayload", "TaskPayload", "TaskRegistered", "TokenIds", "ToolCall",
    "ToolSchemas", "TrainingRun", "TrainingRunPayload", "check_json_depth", "decode", "encode", "event_type",
    "key_of", "new_event", "path_safe_id", "uuid7",
]
