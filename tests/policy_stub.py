"""A local OpenAI-compatible *policy* server with a scripted policy (real HTTP on 127.0.0.1), standing
in for a vLLM-served checkpoint in the agent-runner tests.

    with PolicyStub([{"read_paper": True}, {"tool": "bash", "args": {"cmd": "ls"}}]) as stub:
        run_agent(..., PolicyEndpoint(stub.url, "stub"), ...)
    python -m tests.policy_stub --script script.json --port 8124      # the same, as its own process

Each rollout (told apart by the `X-Klong-Rollout-Id` header the runner sends) walks the script, one
action per successful call:

    {"tool": NAME, "args": {...}, "content": "text"}   an assistant message with one tool call
    {"calls": [[NAME, {...}], ...]}                     several tool calls in one message
    {"text": "..."}                                     an assistant message without a tool call
    {"read_paper": true}                                follows the runner's "Next: read_file_chunk(...)"
                                                        pointer while there is one, then moves on
    {"error": "context_length"}                         HTTP 400 "maximum context length" (vLLM's body)
    any action may add "delay": seconds before answering
    in-process, any action may add "until": a no-argument callable; the answer waits until it returns
    true (an event of the test: the step then happens after that event, whatever the machine's load)

After the script, `then` is answered (default: end_task). `max_context_chars` makes every request
whose messages exceed that many characters fail with the context-length 400 (what a real server
does), without moving the script on. Responses carry vLLM's token extras: `choices[0].token_ids` when
the request asks `return_token_ids`, logprob tokens spelled `token_id:N` with
`return_tokens_as_token_ids`; ids are the UTF-8 bytes of the completion text (content + tool call),
logprobs deterministic. `token_ids=False` answers like a plain OpenAI endpoint (no ids, no logprobs).
Every request is kept in `requests` (rollout id, messages, status, body) unless `keep_requests=False`
(benchmarks: thousands of rollouts). The listen backlog takes a thousand connects at once (a fleet).
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional, Union

NEXT = re.compile(r"Next: read_file_chunk\(file='([^']+)', start_line=(\d+)")
END = {"tool": "end_task", "args": {"end_message": "I am done."}}
Script = Union[list, dict, Callable[[str], list]]


@dataclass
class Request:
    t: float
    rollout_id: str
    messages: list
    body: dict
    status: int = 0


class PolicyStub:
    def __init__(self, script: Script, *, then: Optional[dict] = None, token_ids: bool = True,
                 max_context_chars: Optional[int] = None, port: int = 0, keep_requests: bool = True):
        self.script, self.then, self.token_ids = script, then or END, token_ids
        self.max_context_chars, self.keep_requests = max_context_chars, keep_requests
        self.requests: list[Request] = []
        self.cursor: dict[str, int] = {}
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status, payload = stub._handle(self.headers.get("X-Klong-Rollout-Id", ""), body)
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the runner gave up (rollout deadline)

        class Server(ThreadingHTTPServer):
            request_queue_size = 4096  # listen backlog: a fleet opens ~1,000 connections at once (default 5)

        self._server = Server(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="policy-stub", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> "PolicyStub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def for_rollout(self, rollout_id: str) -> list[Request]:
        return [r for r in self.requests if r.rollout_id == rollout_id]

    # ---- one call ------------------------------------------------------------------------------------

    def _script(self, rollout_id: str) -> list:
        if callable(self.script):
            return self.script(rollout_id)
        if isinstance(self.script, dict):
            return self.script.get(rollout_id, self.script.get("*", []))
        return self.script

    def _handle(self, rollout_id: str, raw: bytes) -> tuple[int, dict]:
        body = json.loads(raw)
        req = Request(time.time(), rollout_id, body.get("messages", []), body)
        with self._lock:
            if self.keep_requests:  # a benchmark's thousands of rollouts would keep every context (O(steps^2))
                self.requests.append(req)
            script, i = self._script(rollout_id), self.cursor.get(rollout_id, 0)
            action = script[i] if i < len(script) else self.then
            chars = sum(len(m.get("content") or "") for m in req.messages)
            if self.max_context_chars and chars > self.max_context_chars:
                req.status = 400
                return 400, _context_error(chars)
            advance = True
            if action.get("read_paper"):
                m = NEXT.search(req.messages[-1].get("content") or "") if req.messages else None
                if m:  # the script stays on read_paper while the runner points at unread lines
                    advance = False
                    action = {"tool": "read_file_chunk", "args": {"file": m.group(1), "start_line": int(m.group(2)),
                                                                  "max_lines": 50}}
                else:  # reading is over: this call takes the next action
                    i += 1
                    action = script[i] if i < len(script) else self.then
            if advance:
                self.cursor[rollout_id] = i + 1
        until, deadline = action.get("until"), time.monotonic() + 600
        while until is not None and not until() and time.monotonic() < deadline:  # the test fails on what follows
            time.sleep(0.05)
        time.sleep(action.get("delay", 0.0))
        if action.get("error") == "context_length":
            req.status = 400
            return 400, _context_error(10**6)
        req.status = 200
        return 200, self._completion(body, action)

    def _completion(self, body: dict, action: dict) -> dict:
        calls = action.get("calls") or ([[action["tool"], action.get("args", {})]] if "tool" in action else [])
        content = action.get("content", action.get("text", f"Next I will call {calls[0][0]}." if calls else ""))
        tool_calls = [{"id": f"call_{time.monotonic_ns()}_{k}", "type": "function",
                       "function": {"name": name, "arguments": json.dumps(args)}} for k, (name, args) in enumerate(calls)]
        choice: dict = {"index": 0, "message": {"role": "assistant", "content": content, "tool_calls": tool_calls or None},
                        "finish_reason": "tool_calls" if calls else "stop", "logprobs": None}
        if self.token_ids:
            text = content + "".join(c["function"]["name"] + c["function"]["arguments"] for c in tool_calls)
            ids = list(text.encode("utf-8"))
            lps = [-((k % 7) + 1) / 10 for k in range(len(ids))]
            extra = body.get("extra_body") or body  # the openai client merges extra_body into the body
            if extra.get("return_token_ids"):
                choice["token_ids"] = ids
            if body.get("logprobs"):
                as_ids = extra.get("return_tokens_as_token_ids")
                choice["logprobs"] = {"content": [{"token": f"token_id:{t}" if as_ids else chr(t), "logprob": lp,
                                                   "bytes": [t], "top_logprobs": []} for t, lp in zip(ids, lps)]}
        return {"id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", ""), "choices": [choice],
                "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}}


def _context_error(chars: int) -> dict:
    return {"object": "error", "type": "BadRequestError", "param": None, "code": 400,
            "message": f"This model's maximum context length is 4096 tokens. However, you requested {chars // 4} "
                       "tokens in the messages. Please reduce the length of the messages."}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--script", required=True, help="JSON file: a list of actions (or {rollout_id: list})")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--no-token-ids", action="store_true")
    args = ap.parse_args()
    with open(args.script) as f:
        script = json.load(f)
    with PolicyStub(script, token_ids=not args.no_token_ids, port=args.port) as stub:
        print(stub.url, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
