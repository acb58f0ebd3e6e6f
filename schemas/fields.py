"""The field types, vocabularies and limits every event shares: the building blocks of schemas.payloads.

    NonNegInt, PosInt, Id, TokenIds, Logprobs, Json    # Annotated types: msgspec checks them on decode
    check_json_depth(rubric, "rubric")                  # ValueError past MAX_JSON_DEPTH nested lists/dicts

The limits hold for every producer and the sink alike, and the exported JSON Schemas state them: an
integer must fit the archive's int64 columns (int32 ones: MAX_INT32); free-form JSON nests at most
MAX_JSON_DEPTH deep. The `arrow` extra of a type tells schemas.arrow which Parquet column it becomes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import msgspec

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


def check_json_depth(value: Any, what: str, limit: int = MAX_JSON_DEPTH) -> None:
    """ValueError when `value` nests lists/dicts more than `limit` deep (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (list, dict)):
            if depth > limit:
                raise ValueError(f"{what} nests more than {limit} levels deep")
            stack.extend((c, depth + 1) for c in (v.values() if isinstance(v, dict) else v))
