"""Harbor's Agent Trajectory Interchange Format (ATIF v1.x) -> importer rows: the trajectory and its sub-agents.

    >>> rows = atif_rows(doc, task_id="fre", base=Path("run/agent"))   # [parent, sub-trajectory, ...]

A trajectory (`schema_version` "ATIF-v1.x") is a root object with `session_id`, `agent` {name, version,
model_name, tool_definitions}, `steps` [{step_id, source system|user|agent, message, tool_calls
[{tool_call_id, function_name, arguments}], observation {results [{source_call_id, content,
subagent_trajectory_ref}]}, metrics {prompt_token_ids, completion_token_ids, logprobs}}] and (v1.7)
embedded `subagent_trajectories`. An agent step becomes an assistant message (its tool calls structured),
then one message per observation result: a `tool` message when the result names its call, else a `user`
message; a result with no content (only a sub-agent reference) adds a message only when it answers a call
(empty). `reasoning_content` is not part of the message text. `agent.tool_definitions` become the row's
`tools`, which a model directory's chat template renders as its `<tools>` block.

Token ids (v1.3+), kept exactly, never re-tokenized: an agent step's `completion_token_ids` (and `logprobs`,
one per id) are its assistant message's ids. The messages before an agent step get what its
`prompt_token_ids` add to everything before (the previous prompt and completion): all of it on the last of
them, an empty list on the others, so a rollout's ids concatenated are exactly what the model was given. Two
agent steps in a row: the added ids go after the first one's completion, with no logprob (NaN). Where a
prompt does not extend what came before (the harness pruned its context) or has no ids, those messages have
none. Their tokenizer is the agent's (`token_source` "atif:AGENT/MODEL"); a rollout whose ids are not
complete is never mixed with re-tokenized steps (`producers.import_events.token_plan`).

Ids: Harbor writes one `session_id` into many files (its golden files all say "NORMALIZED_SESSION_ID"),
so a trajectory's row id is its session_id and the hash of its content: files that share a session_id
become distinct rollouts, and importing the same file again is a no-op. Sub-trajectories (embedded ones,
and `subagent_trajectory_ref` entries whose `trajectory_path` is a file beside the parent's) are imported as
rollouts of their own whose group_id is the parent's rollout id (`SELECT * FROM rollouts WHERE group_id =
'<parent rollout>'` lists them); a reference that resolves to nothing is a warning.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Optional

from schemas.errors import ValidationError

MAX_DEPTH = 4  # sub-trajectories of sub-trajectories ...: a reference cycle stops here


class FormatError(ValidationError):
    """A trajectory does not follow its format; the message says where."""


def _ids(value: Any, where: str, number: bool = False) -> list:
    if not isinstance(value, list):
        raise FormatError(f"{where} must be an array, got {type(value).__name__}")
    for v in value:
        ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)) if number else \
             (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31)
        if not ok:
            raise FormatError(f"{where} holds {v!r}: expected " + ("finite numbers" if number else "token ids (int32 >= 0)"))
    return value


def task_of(doc: Any, task_id: Optional[str], what: str) -> str:
    extra = doc.get("extra") if isinstance(doc, dict) else None
    found = task_id or (extra.get("task_id") if isinstance(extra, dict) else None)
    if not isinstance(found, str) or not found:
        raise FormatError(f"{what} trajectories do not name their task: pass --task-id ID")
    return found


def content_hash(doc: Any) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
                          .encode("utf-8", "surrogatepass")).hexdigest()


def _tools(agent: dict) -> list:
    """agent.tool_definitions (OpenAI function tools, or bare function schemas) -> the row's `tools`."""
    defs = agent.get("tool_definitions")
    if defs is None:
        return []
    if not isinstance(defs, list) or not all(isinstance(t, dict) for t in defs):
        raise FormatError("ATIF agent.tool_definitions must be an array of tool objects")
    return [t if "function" in t else {"type": "function", "function": t} for t in defs]


def atif_rows(doc: Any, task_id: Optional[str] = None, base: Optional[Path] = None, parent: Optional[str] = None,
              key: Optional[str] = None, depth: int = 0) -> list[dict]:
    """An ATIF trajectory -> importer rows: its own first, then each sub-trajectory's (recursively)."""
    row, refs = _convert(doc, task_id)
    sid = doc["session_id"] if isinstance(doc.get("session_id"), str) and doc["session_id"] else None
    if parent is None and sid is None:
        raise FormatError("ATIF: `session_id` (a non-empty string) is required")
    own = (f"{parent}/{key}" if parent is not None else sid) + "@" + content_hash(doc)[:16]
    row["id"] = own
    if parent is not None:
        row["parent_id"] = parent
    rows = [row]
    embedded = doc.get("subagent_trajectories") or []
    if not isinstance(embedded, list) or not all(isinstance(d, dict) for d in embedded):
        raise FormatError("ATIF subagent_trajectories must be an array of trajectories")
    by_id = {d.get("trajectory_id"): d for d in embedded if d.get("trajectory_id")}
    children: list[tuple[str, dict]] = [(str(d.get("trajectory_id") or d.get("session_id") or k), d)
                                        for k, d in enumerate(embedded)]
    for where, ref in refs:
        if ref.get("trajectory_id") in by_id:
            continue  # embedded: imported above
        path = ref.get("trajectory_path")
        found = _ref_file(path, base) if isinstance(path, str) and path else None
        if found is None:
            row["_warnings"].append(f"{where}: sub-trajectory {json.dumps(ref)[:200]} not found (no embedded "
                                    "trajectory_id, no trajectory_path beside the file): not imported")
            continue
        try:
            children.append((Path(path).name, json.loads(found.read_bytes())))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FormatError(f"{where}: sub-trajectory {path}: not valid JSON ({e})") from None
    if children and depth >= MAX_DEPTH:
        raise FormatError(f"ATIF: sub-trajectories nested more than {MAX_DEPTH} deep (a reference cycle?)")
    for name, child in children:
        if not isinstance(child, dict):
            raise FormatError(f"ATIF sub-trajectory {name!r} must be an object")
        rows += atif_rows(child, row["task_id"], base, own, name, depth + 1)
    return rows


def _ref_file(path: str, base: Optional[Path]) -> Optional[Path]:
    """The referenced file when it lies in the parent's directory tree (a reference never reads elsewhere)."""
    if base is None:
        return None
    base = base.resolve()
    target = (base / path).resolve()
    return target if target.is_file() and target.is_relative_to(base) else None


def _convert(doc: Any, task_id: Optional[str]) -> tuple[dict, list[tuple[str, dict]]]:
    """(the trajectory's own row, its sub-agent references with where they are)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("steps"), list) or not doc["steps"]:
        raise FormatError("ATIF: `steps` must be a non-empty array")
    agent = doc.get("agent") if isinstance(doc.get("agent"), dict) else {}
    messages: list[dict] = []
    refs: list[tuple[str, dict]] = []
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
            context = _agent_step(step, where, text, messages, pending, context)
            pending = len(messages)
        obs = step.get("observation")
        if obs is not None:
            _observation(step, obs, where, source, messages, refs)
    row = {"task_id": task_of(doc, task_id, "ATIF"), "messages": messages, "_warnings": []}
    tools = _tools(agent)
    if tools:
        row["tools"] = tools
    model = agent.get("model_name")
    if isinstance(model, str):
        row["model"] = model
    if any("token_ids" in m for m in messages):
        row["token_source"] = f"atif:{agent.get('name') or 'agent'}/{model or 'unknown'}"
    return row, refs


def _agent_step(step: dict, where: str, text: str, messages: list, pending: int, context: Optional[list]):
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
        context = list(prompt)  # (a pruned or rewritten prompt: the messages before keep no ids)
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
        # the completion is what was sampled (the prompt before it holds the generation header); markup the
        # next prompt adds after it is appended below and carries no loss
        msg["n_generation_prompt"], msg["n_sampled"] = 0, len(msg["token_ids"])
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
    return context


def _observation(step: dict, obs: Any, where: str, source: str, messages: list, refs: list) -> None:
    results = obs.get("results") if isinstance(obs, dict) else None
    if not isinstance(results, list):
        raise FormatError(f"{where}.observation: results must be an array")
    call_ids = {c.get("tool_call_id") for c in step.get("tool_calls") or [] if isinstance(c, dict)}
    for j, r in enumerate(results):
        if not isinstance(r, dict):
            raise FormatError(f"{where}.observation.results[{j}] must be an object")
        sub = r.get("subagent_trajectory_ref")
        if sub is not None:
            if not isinstance(sub, list) or not all(isinstance(x, dict) for x in sub):
                raise FormatError(f"{where}.observation.results[{j}].subagent_trajectory_ref must be an array of objects")
            refs += [(f"{where}.observation.results[{j}]", x) for x in sub]
        content = r.get("content")
        call = r.get("source_call_id")
        answers = call is not None and source == "agent" and call in call_ids
        if content is None and sub is not None:
            if answers:  # the call needs its result; the sub-agent's work is its own rollout
                messages.append({"role": "tool", "tool_call_id": call, "content": ""})
            continue
        if not isinstance(content, str):
            raise FormatError(f"{where}.observation.results[{j}].content must be a string")
        if answers:
            messages.append({"role": "tool", "tool_call_id": call, "content": content})
        else:
            messages.append({"role": "user", "content": content})


def atif_row(doc: Any, task_id: Optional[str] = None) -> dict:
    """The trajectory's own row (no sub-trajectories): `atif_rows(doc, task_id)[0]`."""
    return atif_rows(doc, task_id)[0]
