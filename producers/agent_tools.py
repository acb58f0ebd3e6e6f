"""The reference agent's tools, as in PaperBench's basic agent: bash, python, read_file_chunk,
search_file, end_task (names, arguments and output formats follow PaperBench / inspect_ai).

    TOOLS                                        # OpenAI `tools=` schemas
    out = execute(sandbox, "bash", '{"cmd": "ls"}', timeout_s=30)   # ToolOutput(text, ...)
    tracker = ReadingTracker({"/r/paper/paper.md": 120})            # mandatory paper reading

Tool errors (bad JSON arguments, a missing file, a line past the end) come back to the model as
text, as PaperBench's ToolError does: the model reads them and tries again; nothing is raised.
Long outputs are cut to `max_output_bytes` with inspect_ai's wording, keeping the head and the
tail (a failing command's error is at the end).
"""

from __future__ import annotations

import json
import re
import signal
from dataclasses import dataclass
from typing import Any, Optional

from producers.sandbox import Sandbox


def _fn(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required, "additionalProperties": False}}}


TOOLS: list[dict] = [
    _fn("bash", "Use this function to execute bash commands.",
        {"cmd": {"type": "string", "description": "The bash command to execute."}}, ["cmd"]),
    _fn("python", "Use the python function to execute Python code. The Python tool executes single-run Python "
        "scripts. Important notes: 1. Each execution is independent - no state is preserved between runs. "
        "2. You must explicitly use print() statements to see any output.",
        {"code": {"type": "string", "description": "The python code to execute."}}, ["code"]),
    _fn("read_file_chunk", "Read a chunk of lines from a file.",
        {"file": {"type": "string", "description": "Path to the file to read"},
         "start_line": {"type": "integer", "description": "Line number to start reading from (1-indexed)"},
         "max_lines": {"type": "integer", "description": "Maximum number of lines to read (default: 50, max: 50)"}},
        ["file"]),
    _fn("search_file", "Search for a keyword or phrase in a file and return matching lines with context.",
        {"file": {"type": "string", "description": "Path to the file to search"},
         "query": {"type": "string", "description": "Text to search for (case-insensitive)"},
         "context_lines": {"type": "integer", "description": "Lines of context before and after each match (default: 2)"},
         "max_matches": {"type": "integer", "description": "Maximum number of matches per page (default: 5)"},
         "page": {"type": "integer", "description": "Which page of results to return (1-indexed, default: 1)"}},
        ["file", "query"]),
    _fn("end_task", "Signal that you are completely finished and that you would like to end the task.",
        {"end_message": {"type": "string", "description": "Final message to signal that you are finished."}},
        ["end_message"]),
]
TOOL_NAMES = frozenset(t["function"]["name"] for t in TOOLS)


READ_CAP = 64 * 1024  # bytes of read_file_chunk / search_file output shown at least


class ToolError(Exception):
    """A tool call the model got wrong: its message goes back to the model."""


@dataclass(frozen=True)
class ToolOutput:
    text: str
    timed_out: bool = False
    error: bool = False
    chunk: Optional[tuple[str, int, int]] = None  # read_file_chunk: (path, first line, last line) shown


def truncate_output(tool: str, text: str, max_bytes: int) -> str:
    """inspect_ai's wording for an over-long tool output; head and tail kept."""
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    half = max_bytes // 2
    kept = (data[:half].decode("utf-8", errors="ignore") + f"\n[... {len(data) - 2 * half} bytes omitted ...]\n"
            + data[-half:].decode("utf-8", errors="ignore"))
    return (f"The output of your call to {tool} was too long to be displayed.\nHere is a truncated version:\n"
            f"<START_TOOL_OUTPUT>\n{kept}\n<END_TOOL_OUTPUT>")


def parse_arguments(arguments: str) -> dict:
    try:
        args = json.loads(arguments or "{}")
    except json.JSONDecodeError as e:
        raise ToolError(f"the arguments are not valid JSON ({e}): {arguments[:200]!r}") from e
    if not isinstance(args, dict):
        raise ToolError(f"the arguments must be a JSON object, got {arguments[:200]!r}")
    return args


def _arg(args: dict, name: str, kind: type, default: Any = ...) -> Any:
    if name not in args:
        if default is ...:
            raise ToolError(f"missing required argument {name!r}")
        return default
    value = args[name]
    if kind is int and isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)  # models often quote numbers
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ToolError(f"argument {name!r} must be {kind.__name__}, got {value!r}")
    return value


def _read_lines(sandbox: Sandbox, path: str) -> list[str]:
    try:
        return sandbox.read_text(path).splitlines()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ToolError(f"File '{path}' not found") from None
    except OSError as e:
        raise ToolError(f"Error reading file: {e}") from None


def read_file_chunk(sandbox: Sandbox, args: dict) -> ToolOutput:
    file, start = _arg(args, "file", str), _arg(args, "start_line", int, 1)
    max_lines = _arg(args, "max_lines", int, 50)
    if start < 1:
        raise ToolError("start_line must be >= 1")
    if not 1 <= max_lines <= 50:
        raise ToolError("max_lines must be >= 1" if max_lines < 1 else "max_lines cannot exceed 50")
    lines = _read_lines(sandbox, file)
    if start > len(lines):
        raise ToolError(f"start_line ({start}) is beyond the total number of lines ({len(lines)}) in the file.")
    end = min(start + max_lines - 1, len(lines))
    body = "\n".join(f"{i}: {lines[i - 1]}" for i in range(start, end + 1))
    return ToolOutput(f"File has {len(lines)} total lines. Showing lines {start} to {end}.\n\n{body}",
                      chunk=(file, start, end))


def search_file(sandbox: Sandbox, args: dict) -> ToolOutput:
    file, query = _arg(args, "file", str), _arg(args, "query", str)
    ctx, per_page, page = (_arg(args, "context_lines", int, 2), _arg(args, "max_matches", int, 5),
                           _arg(args, "page", int, 1))
    if not query:
        raise ToolError("Query cannot be empty.")
    if ctx < 0 or per_page < 1 or page < 1:
        raise ToolError("context_lines must be >= 0, max_matches >= 1 and page >= 1")
    lines, q = _read_lines(sandbox, file), query.lower()
    hits = [i for i, line in enumerate(lines) if q in line.lower()]
    if not hits:
        return ToolOutput(f"No matches found for '{q}' in {file}")
    pages = (len(hits) + per_page - 1) // per_page
    if page > pages:
        return ToolOutput(f"Invalid page number. There are only {pages} pages of results.")
    first = (page - 1) * per_page
    shown = hits[first:first + per_page]
    parts = [f"Found {len(hits)} matches for '{q}' in {file}",
             f"Showing matches {first + 1}-{first + len(shown)} (Page {page} of {pages})", ""]
    for n, i in enumerate(shown, start=first + 1):
        block = "\n".join(f"{'>>> ' if j == i else '    '}{j + 1}: {lines[j]}"
                          for j in range(max(0, i - ctx), min(len(lines), i + ctx + 1)))
        parts.append(f"[Match {n} of {len(hits)}]\n{block}")
    return ToolOutput("\n\n".join(parts))


def timeout_message(tool: str, asked_s: float, tool_limit_s: float) -> str:
    """Names the limit that fired: the per-call tool timeout, or the rollout's time left when that was
    shorter (the sandbox runs a call under the smaller of the two)."""
    if tool_limit_s <= asked_s:
        return f"Timeout: the {tool} call was killed at the tool timeout of {tool_limit_s:g} s."
    return (f"Timeout: the {tool} call was killed after {asked_s:.0f} s, when the rollout's time ran out "
            f"(the tool timeout is {tool_limit_s:g} s).")


def _exec(sandbox: Sandbox, tool: str, command: str, timeout_s: float, stdin: Optional[str] = None) -> ToolOutput:
    res = sandbox.run(command, timeout_s=timeout_s, stdin=stdin)
    text = res.output.strip()
    if res.timed_out:
        text += "\n\n" + timeout_message(tool, timeout_s, sandbox.limits.tool_timeout_s)
    elif res.exit_code and res.exit_code < 0:
        text += f"\n\n(killed by {signal.Signals(-res.exit_code).name}: a sandbox limit was reached)"
    elif res.exit_code:
        text += f"\n\n(exit code {res.exit_code})"
    return ToolOutput(truncate_output(tool, text, sandbox.limits.max_output_bytes), timed_out=res.timed_out)


def execute(sandbox: Sandbox, name: str, arguments: str, *, timeout_s: float, python: str = "python3") -> ToolOutput:
    """Runs one tool call (end_task is the agent loop's business and not handled here)."""
    try:
        if name not in TOOL_NAMES or name == "end_task":
            raise ToolError(f"unknown tool {name!r}; the tools are {', '.join(sorted(TOOL_NAMES))}")
        args = parse_arguments(arguments)
        if name == "bash":
            return _exec(sandbox, "bash", _arg(args, "cmd", str), timeout_s)
        if name == "python":
            return _exec(sandbox, "python", python + " -", timeout_s, stdin=_arg(args, "code", str))
        out = read_file_chunk(sandbox, args) if name == "read_file_chunk" else search_file(sandbox, args)
        # 50 lines of a paper must come through whole (the reading tracker counts them as read): only
        # pathological lines meet this cap.
        return ToolOutput(truncate_output(name, out.text, max(sandbox.limits.max_output_bytes, READ_CAP)),
                          chunk=out.chunk)
    except ToolError as e:
        return ToolOutput(f"ToolError: {e}", error=True)


class ReadingTracker:
    """Mandatory paper reading (KLong's scaffold): which lines of each required file the agent has
    seen through read_file_chunk. Until all are seen, other tools are refused with a pointer to the
    next unread chunk, and every step is part of the pinned prefix."""

    def __init__(self, files: dict[str, int]):  # path -> number of lines
        self.total = {p: n for p, n in files.items() if n > 0}
        self.seen: dict[str, set[int]] = {p: set() for p in self.total}

    @property
    def done(self) -> bool:
        return all(len(self.seen[p]) >= n for p, n in self.total.items())

    def record(self, chunk: Optional[tuple[str, int, int]], resolve) -> None:
        if chunk is None:
            return
        path = resolve(chunk[0])
        if path in self.seen:
            self.seen[path].update(range(chunk[1], chunk[2] + 1))

    def next_chunk(self) -> Optional[tuple[str, int]]:
        for p, n in self.total.items():
            missing = next((i for i in range(1, n + 1) if i not in self.seen[p]), None)
            if missing is not None:
                return p, missing
        return None

    def status(self) -> str:
        read = ", ".join(f"{len(self.seen[p])}/{n} lines of {p}" for p, n in self.total.items())
        nxt = self.next_chunk()
        if nxt is None:
            return f"[Paper reading complete: {read}. You may now use all tools.]"
        return (f"[Mandatory paper reading: {read} read. Next: read_file_chunk(file='{nxt[0]}', "
                f"start_line={nxt[1]}, max_lines=50)]")


NEXT_CHUNK = re.compile(r"Next: read_file_chunk\(file='([^']+)', start_line=(\d+)")
