"""JSON Schema (Draft 2020-12) of every event type, derived from the Structs in `schemas.events`.

    klong schemas export DIR      # DIR/events.schema.json (all types) + DIR/<event_type>.schema.json each
    >>> validator = jsonschema.Draft202012Validator(events_schema(), format_checker=...)

A producer in any language validates what it sends against these and the sink accepts it. They start from
msgspec's schema of the Structs (so every limit declared there, `ge`/`le`/`min_length`/..., follows
automatically) and add what msgspec leaves out, so the schema accepts what the sink accepts:

- `oneOf` over the event types, each with `event_type` as a `const` (no OpenAPI `discriminator`: only
  standard 2020-12 keywords, so strict validators such as ajv's strict mode take them);
- integers the Structs leave unbounded limited to int64 (what the archive's Parquet columns hold);
- `schema_version` at most this reader's version; `rollout_id` required (a string) where it is the key;
- token arrays as a JSON list or base64 whose decoded length is a multiple of 4 bytes (a `pattern`);
- free-form JSON (a rubric, a training config) nested at most `MAX_JSON_DEPTH` deep (one definition per level);
- the rules across fields: `logprobs`, `tool_call` and the sampling fields only on assistant steps,
  `n_generation_prompt` with `n_sampled` (and token_ids), a valid judge result has a score;
- a description on every event, payload and field, with each event's Kafka topic and key.

What JSON Schema cannot say, and the sink still checks (its dead letters name it): `logprobs` has one value
per token id; `n_generation_prompt + n_sampled` is at most the number of token ids; an integer field holds a JSON integer (`2`, not `2.0`, which JSON Schema counts as an
integer); a `blob_ref` names a blob in the sink's blob store (claim checks are for the Python SDK).
The sink also takes a few spellings of `produced_at` beyond RFC 3339 (`t`/`z` lower case, a space for
`T`, `+0100`); the schema asks for RFC 3339 (`format: date-time`).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import msgspec

from schemas.events import EVENT_CLASSES, KEY_FIELD, MAX_JSON_DEPTH, SCHEMA_VERSION, Event, event_type

DRAFT = "https://json-schema.org/draft/2020-12/schema"
ID_BASE = "urn:klong:schemas:v1:"
# Base64 whose decoded length is a multiple of 4 bytes: 16 characters carry 12 bytes; the tail carries 4
# ("xxxxxx==") or 8 ("xxxxxxxxxxx=") more.
BASE64_WORDS = r"^(?:[A-Za-z0-9+/]{16})*(?:[A-Za-z0-9+/]{6}==|[A-Za-z0-9+/]{11}=)?$"
TOPICS = {  # event type -> topic (prefix "klong", KLONG_TOPIC_PREFIX changes it); core.settings.Topics.for_event
    "task_registered": "klong.tasks", "rollout_started": "klong.rollouts", "step": "klong.rollouts",
    "snapshot": "klong.rollouts", "rollout_resumed": "klong.rollouts", "rollout_ended": "klong.rollouts",
    "judge_requested": "klong.judge.requests.eval (priority eval) or klong.judge.requests.train (priority train)",
    "judge_result": "klong.judge.results", "training_run": "klong.training", "rl_iteration": "klong.training",
}
EVENT_DOCS = {
    "task_registered": "A task (paper) and its rubric tree; a changed task is registered again as a new version.",
    "rollout_started": "An agent run of one task begins.",
    "step": "One message of a rollout: what the model was given (system, user, tool) or what it did (assistant).",
    "snapshot": "The submission state at a step, to be judged.",
    "rollout_resumed": "A partial rollout carried into a new iteration, possibly under a new policy_version.",
    "rollout_ended": "A rollout ended; its last event.",
    "judge_requested": "A request to grade a rollout's snapshot against its task's rubric.",
    "judge_result": "The judge's score Q of a rollout at a step, with per-rubric-leaf scores.",
    "training_run": "A training run's lineage: dataset version in, metrics, checkpoints, policy_version out.",
    "rl_iteration": "A fact of the progressive-RL stage scheduler about one iteration of a plan run.",
}
ENVELOPE_DOCS = {
    "event_type": "The event type; selects the payload schema.",
    "event_id": "Unique id of this event (a UUIDv7 is recommended); a resend with the same id is read once.",
    "schema_version": f"Version of the event schemas the producer follows (this reader: {SCHEMA_VERSION}).",
    "producer_id": "Who produced the event (host, process, tool).",
    "produced_at": "When the event was produced: RFC 3339 with a time zone, e.g. 2025-01-31T12:00:00.123Z.",
    "rollout_id": "The rollout this event belongs to.",
    "payload": "The typed content of the event.",
}
FIELD_DOCS = {
    "task_id": "Task (paper) id.", "title": "Human-readable task title.", "split": "train or eval; eval tasks never "
    "enter a training dataset.", "paper_md": "The paper as markdown, inline.", "paper_ref": "Or a content-addressed "
    "reference to it (sha256:...).", "addendum": "Extra instructions for the agent.", "judge_addendum": "Extra "
    "instructions for the judge.", "rubric": "PaperBench rubric.json tree (id, requirements, weight, sub_tasks, "
    "task_category, finegrained_task_category).", "blacklist": "URLs the agent must not use.",
    "content_hash": "sha256 over the task's content.", "group_id": "The n rollouts of one sample share it "
    "(group-relative advantages).", "stage": "Progressive-RL stage m (1-based).", "iteration": "Iteration number.",
    "timeout_s": "Rollout timeout T(m) in seconds.", "policy_version": "Version of the policy that acted.",
    "scaffold": "Agent scaffold name.", "model": "Model name.", "step_idx": "0-based index of the step in its "
    "rollout, dense (0, 1, 2, ... without gaps).", "role": "system | user | assistant | tool.",
    "content": "The message text.", "tool_call": "The tool call of an assistant step.", "tool_call_id": "Tool "
    "steps: the id of the call this output answers.", "token_ids": "Exactly the token ids this step added to the "
    "model's context, chat-template markup included: a JSON list of int32, or base64 of little-endian int32. "
    "Absent for text-only steps (tokenized when a dataset is built).", "logprobs": "Assistant steps: behaviour-policy "
    "logprob of each token id (same length as token_ids): a JSON list, or base64 of little-endian float32.",
    "pinned": "Part of the pinned prefix (task spec, paper reading).", "elapsed_s": "Seconds since the rollout "
    "started.", "blob_ref": "Claim check (Python SDK): content and token arrays live in the sink's blob store.",
    "ref": "Reference of the submission state (sha256:... blob or a directory under the data home).",
    "n_files": "Files in the snapshot.", "n_bytes": "Bytes in the snapshot.", "next_step_idx": "step_idx of the "
    "next step after the resume.", "status": "finished | timeout | error | aborted.", "n_steps": "Number of steps "
    "the rollout has.", "error": "Error text.", "request_id": "Id of the judge request.", "priority": "eval | train "
    "(eval requests never wait behind train ones).", "snapshot_ref": "Snapshot to grade.", "judge_model":
    "Judge model name.", "score": "Q in [0, 1], the rubric root score; required when valid.", "valid": "Whether "
    "the grading succeeded.", "leaf_scores": "Per rubric leaf: id, score in [0, 1], valid, explanation.",
    "n_invalid_leaves": "Leaves the judge could not grade.", "prompt_tokens": "Judge prompt tokens.",
    "completion_tokens": "Judge completion tokens.", "latency_s": "Judge latency in seconds.", "run_id": "Training "
    "run id.", "phase": "Phase of the run or iteration this fact reports.", "dataset": "Dataset version NAME@N.",
    "dataset_hash": "Content hash of that version.", "mode": "sft | rl.", "policy_version_in": "Policy version "
    "trained from.", "policy_version_out": "Policy version produced.", "step": "Optimizer step.", "metrics":
    "Metric name -> value.", "config": "The run's configuration (free-form JSON).", "checkpoint": "Checkpoint "
    "path.", "plan": "Plan name.", "rollouts": "Rollout ids started.", "carried_in": "Rollout ids carried in.",
    "carried_out": "Rollout ids carried out.", "not_started": "Rollout ids never started.", "ended": "status -> "
    "number of rollouts that ended.", "judged": "Ended rollouts with a judge result.", "judge_missing": "Judge "
    "requests without a result at the wait's end.", "rolling_s": "Seconds from start to close.", "judge_wait_s":
    "Seconds waited for the archive and judge.", "build_s": "Dataset build seconds.", "train_s": "Train hook "
    "seconds.", "n_samples": "Samples in the dataset version.", "name": "Tool (function) name.", "arguments":
    "Arguments as JSON text, as OpenAI-compatible APIs return them.", "id": "Id (tool call id, rubric leaf id).",
    "explanation": "Why the leaf got its score.",
    "tokenizer": "Fingerprint of the vocabulary and chat template the steps' token_ids come from (\"\": unknown).",
    "context_start": "Token-in/token-out runners: the model was given steps [0, P) ++ [context_start, step_idx) "
    "when it produced this step (P: the pinned prefix); null: unknown.",
    "n_generation_prompt": "Assistant steps: how many of token_ids are the generation prompt the chat template "
    "opened the turn with (<|im_start|>assistant\\n) before the sampled ids; with n_sampled. Null: unknown (the "
    "dataset builder infers it).", "n_sampled": "Assistant steps: how many token_ids after the generation prompt "
    "the policy sampled (its end-of-turn id included when it stopped); the rest are the ids the template closes "
    "the turn with. Only sampled ids carry loss.", "finish_reason": "Assistant steps: why sampling ended (stop, "
    "length: cut by max_tokens or the context).", "temperature": "Assistant steps: the sampling temperature (null: "
    "unknown, trained as 1.0; 0: greedy).", "top_p": "Assistant steps: nucleus sampling (1: off).", "top_k":
    "Assistant steps: top-k sampling (-1 or 0: off).",
}
ARRAY_FIELDS = {"token_ids": ("int32", {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}),
                "logprobs": ("float32", {"type": "number"})}


def _array_schema(name: str) -> dict:
    kind, item = ARRAY_FIELDS[name]
    return {"description": FIELD_DOCS[name], "anyOf": [
        {"type": "array", "items": item},
        {"type": "string", "contentEncoding": "base64", "pattern": BASE64_WORDS,
         "description": f"base64 of little-endian {kind} (a multiple of 4 bytes)"},
        {"type": "null"}]}


def _comments() -> dict[str, dict[str, str]]:
    """Struct name -> field -> the comment after it in `schemas.events` (how that module documents fields)."""
    import inspect

    import schemas.events as events

    out: dict[str, dict[str, str]] = {}
    struct = None
    for line in inspect.getsource(events).splitlines():
        if m := re.match(r"class (\w+)\(", line):
            struct = out.setdefault(m[1], {})
        elif struct is not None and (m := re.match(r"    (\w+): [^#]+#\s*(.+)$", line)):
            struct[m[1]] = m[2].strip()
    return out


def _describe(defs: dict) -> None:
    comments = _comments()
    for name, d in defs.items():
        for field, prop in d.get("properties", {}).items():
            if "description" not in prop:
                doc = FIELD_DOCS.get(field) or comments.get(name, {}).get(field)
                prop["description"] = doc or f"`{field}`: see the description of {name}."
            if field in ARRAY_FIELDS:
                d["properties"][field] = _array_schema(field)
            elif field in JSON_FIELDS and not prop.get("type") and "anyOf" not in prop:
                d["properties"][field] = {"$ref": "#/$defs/Json1",
                                          "description": f"{FIELD_DOCS[field]} At most {MAX_JSON_DEPTH} levels deep."}


JSON_FIELDS = ("rubric", "config")  # free-form JSON (`schemas.events.Json`): nesting limited to MAX_JSON_DEPTH


def _json_depth_defs() -> dict:
    """`Json1` .. `Json{MAX_JSON_DEPTH + 1}`: a JSON value at nesting depth k (arrays/objects allowed up to
    MAX_JSON_DEPTH, as `schemas.events.check_json_depth`); JSON Schema has no depth keyword, so one definition
    per level."""
    scalars = [{"type": t} for t in ("string", "number", "boolean", "null")]
    defs = {f"Json{MAX_JSON_DEPTH + 1}": {"description": "A JSON scalar (the nesting limit is reached).",
                                          "anyOf": scalars}}
    for k in range(MAX_JSON_DEPTH, 0, -1):
        inner = {"$ref": f"#/$defs/Json{k + 1}"}
        defs[f"Json{k}"] = {"description": f"A JSON value at nesting depth {k} (of at most {MAX_JSON_DEPTH}).",
                            "anyOf": scalars + [{"type": "array", "items": inner},
                                                {"type": "object", "additionalProperties": inner}]}
    return defs


def _int64(schema) -> None:
    """Integers the Structs leave unbounded get the archive's int64 range (Parquet columns are int64 at most)."""
    if isinstance(schema, dict):
        if schema.get("type") == "integer":
            if "maximum" not in schema and "exclusiveMaximum" not in schema:
                schema["maximum"] = 2**63 - 1
            if "minimum" not in schema and "exclusiveMinimum" not in schema:
                schema["minimum"] = -2**63
        for value in schema.values():
            _int64(value)
    elif isinstance(schema, list):
        for value in schema:
            _int64(value)


def _cross_field_rules(defs: dict) -> None:
    not_assistant = {"type": "object", "properties": {"role": {"not": {"const": "assistant"}}}, "required": ["role"]}
    assistant_only = ("logprobs", "tool_call", "n_generation_prompt", "n_sampled", "finish_reason", "temperature",
                      "top_p", "top_k")
    given = lambda f: {"type": "object", "properties": {f: {"not": {"type": "null"}}}, "required": [f]}  # noqa: E731
    defs["StepPayload"]["allOf"] = [
        {"if": not_assistant,
         "then": {"type": "object", "properties": {f: {"type": "null"} for f in assistant_only}}},
        # n_generation_prompt and n_sampled go together, and count token_ids (unless claim-checked)
        {"if": given("n_sampled"), "then": given("n_generation_prompt")},
        {"if": given("n_generation_prompt"), "then": given("n_sampled")},
        {"if": {"allOf": [given("n_sampled"), {"not": given("blob_ref")}]}, "then": given("token_ids")}]
    defs["JudgeResultPayload"]["allOf"] = [{
        "if": {"type": "object", "properties": {"valid": {"const": True}}, "required": ["valid"]},
        "then": {"type": "object", "properties": {"score": {"type": "number"}}, "required": ["score"]}}]


def _event_def(d: dict, cls: type) -> None:
    tag = event_type(cls)
    key = KEY_FIELD[cls]
    props = d["properties"]
    props["event_type"] = {"const": tag, "description": ENVELOPE_DOCS["event_type"]}
    props["schema_version"]["maximum"] = SCHEMA_VERSION
    for field, doc in ENVELOPE_DOCS.items():
        props[field].setdefault("description", doc)
    if key == "rollout_id":
        props["rollout_id"] = {"type": "string", "minLength": 1, "maxLength": 256,
                               "description": ENVELOPE_DOCS["rollout_id"] + " Required: it is the Kafka key."}
        d["required"] = d["required"] + ["rollout_id"]
    key_doc = "rollout_id" if key == "rollout_id" else f"payload.{key}"
    d["description"] = (f"{EVENT_DOCS[tag]} Topic: {TOPICS[tag]}. Kafka key: {key_doc} (UTF-8), partitioned with "
                        "Java's murmur2 (librdkafka: partitioner=murmur2_random). One JSON object per message.")


def events_schema() -> dict:
    """The schema of any event (a `oneOf` over the types), with `$defs` for every type and payload."""
    base = msgspec.json.schema(Event)
    defs = copy.deepcopy(base["$defs"])
    for cls in EVENT_CLASSES:
        _event_def(defs[cls.__name__], cls)
    for name, d in defs.items():
        if "description" not in d and name.endswith("Payload"):
            d["description"] = f"Payload of a {name.removesuffix('Payload')} event."
        elif "description" not in d:
            d["description"] = FIELD_DOCS.get(name[0].lower() + name[1:], f"{name}.")
    _describe(defs)
    _int64(defs)
    defs.update(_json_depth_defs())
    _cross_field_rules(defs)
    return {"$schema": DRAFT, "$id": ID_BASE + "events", "title": "KLong event",
            "description": "Any KLong event: an envelope (event_id, event_type, schema_version, producer_id, "
                           "produced_at, rollout_id) and a typed payload. Wire format: one JSON object per Kafka "
                           "message.",
            "oneOf": [{"$ref": f"#/$defs/{c.__name__}"} for c in EVENT_CLASSES], "$defs": defs}


def event_schema(cls: type) -> dict:
    """The schema of one event type (a standalone document: its `$defs` are all the definitions)."""
    whole = events_schema()
    return {"$schema": DRAFT, "$id": ID_BASE + event_type(cls), "$ref": f"#/$defs/{cls.__name__}",
            "$defs": whole["$defs"]}


def export(directory: str | Path) -> list[Path]:
    """Writes `events.schema.json` and one `<event_type>.schema.json` per type into `directory`."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for cls in EVENT_CLASSES:
        path = out / f"{event_type(cls)}.schema.json"
        path.write_text(json.dumps(event_schema(cls), indent=2, sort_keys=True) + "\n")
        written.append(path)
    union = out / "events.schema.json"
    union.write_text(json.dumps(events_schema(), indent=2, sort_keys=True) + "\n")
    written.append(union)
    return written
