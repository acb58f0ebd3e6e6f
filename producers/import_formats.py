"""Other harnesses' trajectory files -> the importer's rows (OpenAI chat messages), one or more per trajectory.

    klong import trajectories run/agent/trajectory.json --format atif --task-id fre
    klong import trajectories django__django-1234.traj --task-id fre          # format detected
    >>> for line, row, reason in read_objects(path, "auto", task_id="fre"): ...    # row: what parse_row takes

Formats (`--format`, default `auto`: detected per trajectory):

- `openai`: JSONL, one row per line, `{"task_id", "messages": [...], ...}` (`producers.importer`).
- `atif`: Harbor's Agent Trajectory Interchange Format, its token ids kept, its tool definitions as the
  row's `tools`, its sub-agents' trajectories as rollouts of their own (`producers.import_atif`).
- `mini-swe`: mini-SWE-agent's `.traj.json` (`trajectory_format` "mini-swe-agent-1"/"-1.1": `info`,
  `messages`; or the older bare list of messages). Messages are taken as they are (the `bash` block stays
  in the assistant text; command output comes back as a `user` message, as the model saw it); `exit`
  messages and each message's `extra` are left out. The model name comes from `info.config.model`.
- `swe-agent`: SWE-agent's `.traj` (`history`, `trajectory`, `info`): the `history` is what the model was
  given, OpenAI-shaped; a tool message names its call in `tool_call_ids` (a list: its one id is the
  `tool_call_id`). `agent`, `message_type`, `thought`, `action` and `is_demo` are left out of the message.

None of these formats names the task: `--task-id` (or a trajectory's `extra.task_id` in ATIF) does. Row ids
come from the trajectory's content (ATIF: its session_id and content), so importing a file again is a
no-op and two files never merge into one rollout. A file holds one trajectory (a JSON document,
pretty-printed or not) or one per line (JSONL); a bad trajectory is reported with its line number and
skipped, like a bad row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Optional

from producers.import_atif import FormatError, atif_row, atif_rows, task_of

__all__ = ["FORMATS", "FormatError", "atif_row", "atif_rows", "detect", "read_objects", "mini_swe_row", "swe_agent_row"]
FORMATS = ("auto", "openai", "atif", "mini-swe", "swe-agent")


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
    """atif | mini-swe | swe-agent | openai (anything else: the importer's row checks say what is wrong)."""
    if isinstance(doc, dict):
        if isinstance(doc.get("schema_version"), str) and doc["schema_version"].upper().startswith("ATIF"):
            return "atif"
        if isinstance(doc.get("trajectory_format"), str) and doc["trajectory_format"].startswith("mini-swe-agent"):
            return "mini-swe"
        if isinstance(doc.get("history"), list) and "messages" not in doc and (
                "trajectory" in doc or "info" in doc):
            return "swe-agent"
    if whole_file and isinstance(doc, list) and doc and all(isinstance(m, dict) and "role" in m for m in doc):
        return "mini-swe"  # mini-SWE-agent before 1.0 saved the bare message list
    return "openai"


def read_objects(path: str | Path, fmt: str = "auto", task_id: Optional[str] = None
                 ) -> Iterator[tuple[int, Optional[dict], Optional[str]]]:
    """(line, importer row, None) or (line, None, reason) for every trajectory of the file (an ATIF
    trajectory's sub-trajectories follow it, on its line)."""
    if fmt not in FORMATS:
        raise FormatError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    for line, doc, reason, whole in _documents(Path(path)):
        if reason is not None:
            yield line, None, reason
            continue
        try:
            kind = detect(doc, whole) if fmt == "auto" else fmt
            if kind == "atif":
                for row in atif_rows(doc, task_id, Path(path).parent):
                    yield line, row, None
            elif kind == "mini-swe":
                yield line, mini_swe_row(doc, task_id), None
            elif kind == "swe-agent":
                yield line, swe_agent_row(doc, task_id), None
            else:
                yield line, (dict(doc, task_id=task_id) if task_id and isinstance(doc, dict)
                             and "task_id" not in doc else doc), None
        except FormatError as e:
            yield line, None, str(e)


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
    row: dict = {"task_id": task_of({}, task_id, "mini-SWE-agent"), "messages": messages}
    model = ((info.get("config") or {}).get("model") or {}).get("model_name") if isinstance(info.get("config"), dict) else None
    if isinstance(model, str):
        row["model"] = model
    return row


# ---- SWE-agent ------------------------------------------------------------------------------------------


def swe_agent_row(doc: Any, task_id: Optional[str] = None) -> dict:
    """A SWE-agent trajectory (.traj: `history` of OpenAI-shaped messages) -> an importer row."""
    history = doc.get("history") if isinstance(doc, dict) else None
    if not isinstance(history, list) or not history:
        raise FormatError("SWE-agent: `history` must be a non-empty array of messages")
    messages = []
    for i, m in enumerate(history):
        if not isinstance(m, dict):
            raise FormatError(f"SWE-agent history[{i}] must be an object")
        msg = {k: v for k, v in m.items() if k in ("role", "content", "tool_calls", "tool_call_id")}
        ids = m.get("tool_call_ids")
        if m.get("role") == "tool" and "tool_call_id" not in m and ids is not None:
            if not isinstance(ids, list) or len(ids) > 1 or not all(isinstance(x, str) for x in ids):
                raise FormatError(f"SWE-agent history[{i}]: tool_call_ids must list the one call this output "
                                  f"answers, got {ids!r}")
            if ids:
                msg["tool_call_id"] = ids[0]
        messages.append(msg)
    info = doc.get("info") if isinstance(doc.get("info"), dict) else {}
    row: dict = {"task_id": task_of({}, task_id, "SWE-agent"), "messages": messages}
    model = info.get("model_name") or (info.get("model_stats") or {}).get("model_name") \
        if isinstance(info.get("model_stats", {}), dict) else None
    if isinstance(model, str):
        row["model"] = model
    return row
