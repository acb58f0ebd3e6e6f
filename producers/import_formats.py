"""Other harnesses' trajectory files -> the importer's rows (OpenAI chat messages), one trajectory each.

    klong import trajectories run/agent/trajectory.json --format atif --task-id fre
    klong import trajectories django__django-1234.traj.json --task-id fre          # format detected
    >>> for line, row, reason in read_objects(path, "auto", task_id="fre"): ...    # row: what parse_row takes

Formats (`--format`, default `auto`: detected per trajectory):

- `openai`: JSONL, one row per line, `{"task_id", "messages": [...], ...}` (`producers.importer`).
- `atif`: Harbor's Agent Trajectory Interchange Format (`schema_version` "ATIF-v1.x"): a root object with
  `session_id`, `agent` {name, version, model_name}, `steps` [{step_id, source system|user|agent, message,
  tool_calls [{tool_call_id, function_name, arguments}], observation {results [{source_call_id, content}]},
  metrics {prompt_token_ids, completion_token_ids, logprobs}}]. An agent step becomes an assistant message
  (its tool calls structured) followed by one message per observation result: a `tool` message when the
  result names its call, else a `user` message. `reasoning_content` is not part of the message text.
  Token ids (v1.3+/v1.4), kept exactly, never re-tokenized: an agent step's `completion_token_ids` (and
  `logprobs`, one per id) are its assistant step's ids. The messages before an agent step get what its
  `prompt_token_ids` add to everything before (the previous prompt and completion): all of it on the last of
  them (template markup and the next assistant header included), an empty list on the others, so a
  rollout's step ids concatenated are exactly what the model was given. Two agent steps in a row: the
  added ids go after the first one's completion, with no logprob (NaN). Where a prompt does not extend
  what came before (the harness pruned its context) or has no ids, those messages stay text-only.
- `mini-swe`: mini-SWE-agent's `.traj.json` (`trajectory_format` "mini-swe-agent-1"/"-1.1": `info`,
  `messages`; or the older bare list of messages). Messages are taken as they are (the `bash` block stays
  in the assistant text; command output comes back as a `user` message, as the model saw it); `exit`
  messages and each message's `extra` are left out. The model name comes from `info.config.model`.

Neither format names the task: `--task-id` (or a trajectory's `extra.task_id` in ATIF) does. The row id is
the ATIF `session_id` (mini-SWE-agent: the content hash), so importing a file again is a no-op. A file
holds one trajectory (a JSON document, pretty-printed or not) or one per line (JSONL); a bad trajectory is
reported with its line number and skipped, like a bad row.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator, Optional

from schemas.errors import ValidationError

FORMATS = ("auto", "openai", "atif", "mini-swe")


class FormatError(ValidationError):
    """A trajectory does not follow its format; the message says where."""


# ---- reading files ------------------------------------------------------------------------------------


def _documents(path: Path) -> Iterator[tuple[int, Any, Optional[str], bool]]:
    """(line, decoded JSON, None, whole) or (line, None, reason, whole): one document per line (JSONL), or
    the whole file as one document (whole=True) when it is pretty-printed (its first line opens it alone)."""
    with open(path, "rb") as f:
        first = b""
        for raw in f:
            if raw.strip():
                first = raw
                break
    whole = first.strip() in (b"{", b"[")  # pretty-printed (json.dump indent=2); else JSONL, a bad line its own
    if whole:
        try:
            yield 1, json.loads(path.read_bytes()), None, True
        except UnicodeDecodeError as e:
            yield 1, None, f"not valid UTF-8: {e}", True
        except json.JSONDecodeError as e:
            yield e.lineno, None, f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}", True
        return
    with open(path, "rb") as f:
        for line, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield line, json.loads(raw), None, False
            except UnicodeDecodeError as e:
                yield line, None, f"not valid UTF-8: {e}", False
            except json.JSONDecodeError as e:  # the position within the line, not the file
                yield line, None, f"not valid JSON: {e.msg} at column {e.colno}", False


def detect(doc: Any, whole_file: bool = True) -> str:
    """atif | mini-swe | openai (anything else: the importer's row checks say what is wrong with it)."""
    if isinstance(doc, dict):
        if isinstance(doc.get("schema_version"), str) and doc["schema_version"].upper().startswith("ATIF"):
            return "atif"
        if isinstance(doc.get("trajectory_format"), str) and doc["trajectory_format"].startswith("mini-swe-agent"):
            return "mini-swe"
    if whole_file and isinstance(doc, list) and doc and all(isinstance(m, dict) and "role" in m for m in doc):
        return "mini-swe"  # mini-SWE-agent before 1.0 saved the bare message list
    return "openai"


def read_objects(path: str | Path, fmt: str = "auto", task_id: Optional[str] = None
                 ) -> Iterator[tuple[int, Optional[dict], Optional[str]]]:
    """(line, importer row, None) or (line, None, reason) for every trajectory of the file."""
    if fmt not in FORMATS:
        raise FormatError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    for line, doc, reason, whole in _documents(Path(path)):
        if reason is not None:
            yield line, None, reason
            continue
        try:
            kind = detect(doc, whole) if fmt == "auto" else fmt
            if kind == "atif":
                yield line, atif_row(doc, task_id), None
            elif kind == "mini-swe":
                yield line, mini_swe_row(doc, task_id), None
            else:
                yield line, (dict(doc, task_id=task_id) if task_id and isinstance(doc, dict)
                             and "task_id" not in doc else doc), None
        except FormatError as e:
            yield line, None, str(e)


# ---- ATIF -----------------------------------------------------------------------------------------------


def _ids(value: Any, where: str, number: bool = False) -> list:
    if not isinstance(value, list):
        raise FormatError(f"{where} must be an array, got {type(value).__name__}")
    for v in value:
        ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)) if number else \
             (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31)
        if not ok:
            raise FormatError(f"{where} holds {v!r}: expected " + ("finite numbers" if number else "token ids (int32 >= 0)"))
    return value


def _task(doc: dict, task_id: Optional[str], what: str) -> str:
    extra = doc.get("extra") if isinstance(doc, dict) else None
    found = task_id or (extra.get("task_id") if isinstance(extra, dict) else None)
    if not isinstance(found, str) or not found:
        raise FormatError(f"{what} trajectories do not name their task: pass --task-id ID")
    return found


def atif_row(doc: Any, task_id: Optional[str] = None) -> dict:
    """An ATIF trajectory -> an importer row (messages with `token_ids`/`logprobs` where ATIF has them)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("steps"), list) or not doc["steps"]:
        raise FormatError("ATIF: `steps` must be a non-empty array")
    if not isinstance(doc.get("session_id"), str) or not doc["session_id"]:
        raise FormatError("ATIF: `session_id` (a non-empty string) is required")
    agent = doc.get("agent") if isinstance(doc.get("agent"), dict) else {}
    messages: list[dict] = []
    context: Optional[list] = []  # every token id so far (None: unknown, a prompt had no ids or was pruned)
    pending = 0  # index in `messages` of the first message since the last agent step
    last_step_id = 0
    for k, step in enumerate(doc["steps"]):
        where = f"ATIF steps[{k}]"
        if not isinstance(step, dict):
            raise FormatError(f"{where} must be an object")
        sid, source, text = step.get("step_id"), step.get("source"), step.get("message", "")
        if isinstance(sid, bool) or not isinstance(sid, int) or sid <= last_step_id:
            raise FormatError(f"{where}: step_id must be an integer above the previous one ({last_step_id}), got {sid!r}")
        last_step_id = sid
        if source not in ("system", "user", "agent"):
            raise FormatError(f"{where}: source must be system, user or agent, got {source!r}")
        if not isinstance(text, str):
            raise FormatError(f"{where}: message must be a string, got {type(text).__name__}")
        if source != "agent":
            messages.append({"role": source, "content": text})
        else:
            metrics = step.get("metrics") if isinstance(step.get("metrics"), dict) else {}
            prompt = metrics.get("prompt_token_ids")
            completion = metrics.get("completion_token_ids")
            between = messages[pending:]
            if prompt is not None:
                prompt = _ids(prompt, f"{where}.metrics.prompt_token_ids")
                if context is not None and prompt[:len(context)] == context:
                    added = prompt[len(context):]
                    if between:
                        for m in between:
                            m["token_ids"] = []
                        between[-1]["token_ids"] = added
                    elif messages and messages[-1].get("token_ids") is not None and added:
                        prev = messages[-1]  # agent after agent: template markup after the last completion
                        prev["token_ids"] = prev["token_ids"] + added
                        if prev.get("logprobs") is not None:
                            prev["logprobs"] = prev["logprobs"] + [float("nan")] * len(added)
                context = list(prompt)  # (a pruned or rewritten prompt: the messages before stay text-only)
            else:
                context = None
            msg: dict = {"role": "assistant", "content": text}
            calls = step.get("tool_calls") or []
            if not isinstance(calls, list):
                raise FormatError(f"{where}: tool_calls must be an array")
            if calls:
                msg["tool_calls"] = []
                for j, c in enumerate(calls):
                    if not isinstance(c, dict) or not isinstance(c.get("function_name"), str):
                        raise FormatError(f"{where}.tool_calls[{j}]: function_name (a string) is required")
                    args = c.get("arguments", {})
                    msg["tool_calls"].append({"id": c.get("tool_call_id"), "type": "function", "function": {
                        "name": c["function_name"], "arguments": args if isinstance(args, str) else json.dumps(args)}})
            if completion is not None:
                msg["token_ids"] = list(_ids(completion, f"{where}.metrics.completion_token_ids"))
                lp = metrics.get("logprobs")
                if lp is not None:
                    lp = _ids(lp, f"{where}.metrics.logprobs", number=True)
                    if len(lp) != len(completion):
                        raise FormatError(f"{where}.metrics: {len(lp)} logprobs for {len(completion)} completion "
                                          "token ids (one per id)")
                    msg["logprobs"] = [float(x) for x in lp]
                if context is not None:
                    context += msg["token_ids"]
            else:
                context = None
            messages.append(msg)
            pending = len(messages)
        obs = step.get("observation")
        if obs is not None:
            results = obs.get("results") if isinstance(obs, dict) else None
            if not isinstance(results, list):
                raise FormatError(f"{where}.observation: results must be an array")
            call_ids = {c.get("tool_call_id") for c in step.get("tool_calls") or [] if isinstance(c, dict)}
            for j, r in enumerate(results):
                if not isinstance(r, dict):
                    raise FormatError(f"{where}.observation.results[{j}] must be an object")
                content = r.get("content")
                if content is None:
                    content = json.dumps(r.get("subagent_trajectory_ref", []))
                if not isinstance(content, str):
                    raise FormatError(f"{where}.observation.results[{j}].content must be a string")
                call = r.get("source_call_id")
                if call is not None and source == "agent" and call in call_ids:
                    messages.append({"role": "tool", "tool_call_id": call, "content": content})
                else:
                    messages.append({"role": "user", "content": content})
    row = {"task_id": _task(doc, task_id, "ATIF"), "id": doc["session_id"], "messages": messages}
    model = agent.get("model_name")
    if isinstance(model, str):
        row["model"] = model
    return row


# ---- mini-SWE-agent -------------------------------------------------------------------------------------


def mini_swe_row(doc: Any, task_id: Optional[str] = None) -> dict:
    """A mini-SWE-agent trajectory (.traj.json) -> an importer row."""
    info: dict = {}
    if isinstance(doc, dict):
        info = doc.get("info") if isinstance(doc.get("info"), dict) else {}
        doc = doc.get("messages")
    if not isinstance(doc, list) or not doc:
        raise FormatError("mini-SWE-agent: `messages` must be a non-empty array")
    messages = []
    for i, m in enumerate(doc):
        if not isinstance(m, dict):
            raise FormatError(f"mini-SWE-agent messages[{i}] must be an object")
        if m.get("role") == "exit":  # the run's exit record, not something the model saw
            continue
        messages.append({k: v for k, v in m.items() if k in ("role", "content", "tool_calls", "tool_call_id")})
    row: dict = {"task_id": task_id, "messages": messages}
    if not task_id:
        raise FormatError("mini-SWE-agent trajectories do not name their task: pass --task-id ID")
    model = ((info.get("config") or {}).get("model") or {}).get("model_name") if isinstance(info.get("config"), dict) else None
    if isinstance(model, str):
        row["model"] = model
    return row
