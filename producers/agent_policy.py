"""The reference agent's side of the policy endpoint: token-in/token-out completions (vLLM), or one chat
completion with tools; context-length errors recognised, and context pruning.

    client = PolicyClient(PolicyEndpoint("http://gpu-1:8000/v1", "klong-policy"), request_token_ids=True)
    t = client.complete_tokens(prompt_ids, timeout_s=600, rollout_id=rid)   # /v1/completions, prompt = ids
    t.token_ids, t.logprobs, t.text, t.finish_reason                        # sampled ids exactly as sampled
    content, calls = parse_hermes(t.text)                                   # vLLM's hermes tool-call parsing
    c = client.complete(messages, tools=TOOLS, timeout_s=600, rollout_id=rid)   # the chat API instead
    c.content, c.tool_calls, c.token_ids, c.logprobs       # ids/logprobs None for text-only endpoints
    messages = prune(messages, n_prefix=12)                 # after ContextLengthExceeded

Token-in/token-out (`complete_tokens`, what `producers.agent` uses with a model directory): the prompt is
the rollout's context as token ids, kept by the runner, so nothing is re-tokenized; vLLM returns the
sampled ids (`return_token_ids`) and their logprobs. Tool calls are read from the sampled text with the
regex and rules of vLLM's `hermes` tool parser (importing vLLM's class would need vLLM and a tokenizer
object in every runner): every `<tool_call>{"name", "arguments"}</tool_call>` must be JSON, else the reply
has no tool call at all.

Token ids come from vLLM's extras: `return_token_ids` (`choices[0].token_ids`, vLLM >= 0.10) or,
with `return_tokens_as_token_ids`, logprob tokens spelled `token_id:N`. Plain OpenAI endpoints
reject unknown parameters, so `request_token_ids=False` leaves the extras out (steps are then
text-only and the dataset builder tokenizes them). The rollout id travels in the
`X-Klong-Rollout-Id` header so a shared server (or the test policy) can tell rollouts apart.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

from schemas.errors import TerminalError, TransientError

CONTEXT_ERROR_MARKERS = ("maximum context length", "context length", "context_length_exceeded",
                         "prompt is too long", "too many tokens")


@dataclass(frozen=True)
class PolicyEndpoint:
    """Any OpenAI-compatible chat endpoint (vLLM, the test policy server)."""

    base_url: str
    model: str
    api_key: str = "EMPTY"
    request_timeout_s: float = 600.0


class ContextLengthExceeded(TransientError):
    """The prompt does not fit the model's context: prune and call again."""


class PolicyTimeout(TransientError):
    """The policy did not answer in time."""


class PolicyFailed(TerminalError):
    """The endpoint refused the request for a reason pruning or retrying cannot fix."""


@dataclass(frozen=True)
class Completion:
    content: str
    tool_calls: list[tuple[str, str, str]]  # (id, name, arguments JSON text)
    token_ids: Optional[list[int]]  # int32 [n_tokens] of the sampled completion, or None
    logprobs: Optional[list[float]]  # float32 [n_tokens], one per token id, or None
    finish_reason: str


@dataclass(frozen=True)
class TokenCompletion:
    token_ids: list[int]  # int32 [n] as sampled (ends with the end-of-turn id when the model stopped)
    logprobs: list[float]  # float32 [n], the behaviour logprob of each sampled id
    text: str  # the server's detokenization (special tokens kept)
    finish_reason: str  # stop | length
    prompt_token_ids: Optional[list[int]] = None  # what the server says it was given


HERMES_CALL = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)  # vLLM's hermes parser


def parse_hermes(text: str) -> tuple[str, list[tuple[str, str, str]]]:
    """(content, [(call id, name, arguments JSON)]) the way vLLM's hermes parser reads a reply: the content
    is the text before the first `<tool_call>`; one unparsable call and the whole text is content."""
    if "<tool_call>" not in text:
        return text, []
    try:
        raw = [json.loads(a or b) for a, b in HERMES_CALL.findall(text)]
        calls = [(f"call_{secrets.token_hex(6)}", c["name"], json.dumps(c["arguments"], ensure_ascii=False))
                 for c in raw]
    except (ValueError, KeyError, TypeError):
        return text, []
    if not all(isinstance(name, str) and name for _, name, _ in calls):
        return text, []
    return text[:text.find("<tool_call>")], calls


def tool_call_regex(tools: list[dict], max_chars: int = 120) -> str:
    """A regex of exactly one hermes tool call `<tool_call>\n{"name": N, "arguments": {...}}\n</tool_call>` to
    one of `tools` with its required arguments in schema order, each string one line of at most `max_chars`
    characters (so a call fits a small max_tokens instead of being cut): vLLM's structured outputs
    (`structured_outputs: {"regex": ...}`) then sample only well-formed calls. vLLM returns the logprobs of
    that constrained distribution (a forced token has logprob 0), so the recorded behaviour logprobs are the
    true sampling probabilities, not the bare model's: they differ from the trainer's (its `mismatch` metric
    shows by how much), and only `loss.old_logprobs: recompute` (the default) keeps both sides of the ratio
    on one model."""
    json_type = {"string": r'"([^"\\\n]|\\["\\/nt]){0,%d}"' % max_chars, "integer": r"-?[0-9]{1,9}"}
    calls = []
    for tool in tools:
        fn, params = tool["function"], tool["function"].get("parameters") or {}
        props = params.get("properties") or {}
        args = [rf'"{re.escape(k)}": {json_type[props[k].get("type", "string")]}' for k in params.get("required", [])]
        calls.append(r'\{"name": "' + re.escape(fn["name"]) + r'", "arguments": \{' + ", ".join(args) + r"\}\}")
    return r"<tool_call>\n(" + "|".join(calls) + r")\n</tool_call>"


def _tokens(choice: dict) -> tuple[Optional[list[int]], Optional[list[float]]]:
    content = ((choice.get("logprobs") or {}).get("content")) or []
    lps = [float(t["logprob"]) for t in content] or None
    ids = choice.get("token_ids")  # vLLM return_token_ids
    if ids is None and content and all(str(t.get("token", "")).startswith("token_id:") for t in content):
        ids = [int(t["token"].split(":", 1)[1]) for t in content]  # vLLM return_tokens_as_token_ids
    if ids is None:
        return None, None
    return [int(i) for i in ids], (lps if lps is not None and len(lps) == len(ids) else None)


_SHARED: dict[tuple, tuple] = {}  # (base_url, api_key, max_retries, timeout) -> (client, its no-retry copy)
_SHARED_LOCK = threading.Lock()
MAX_CONNECTIONS = 4096  # concurrent policy calls of one process (a fleet worker runs ~1,000 rollouts)


def _shared_client(policy: PolicyEndpoint, max_retries: int):
    """One HTTP client per endpoint and process, shared by every rollout: a client costs ~25 ms of CPU to
    build (TLS context, transport) and its keep-alive pool saves a connect per call."""
    import httpx2
    import openai

    key = (policy.base_url, policy.api_key or "EMPTY", max_retries, policy.request_timeout_s)
    with _SHARED_LOCK:
        pair = _SHARED.get(key)
        if pair is None:
            limits = httpx2.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS)
            client = openai.OpenAI(base_url=policy.base_url, api_key=policy.api_key or "EMPTY",
                                   max_retries=max_retries, timeout=policy.request_timeout_s,
                                   http_client=openai.DefaultHttpxClient(limits=limits))
            pair = _SHARED[key] = (client, client.with_options(max_retries=0))  # the copy shares the connections
        return pair


class PolicyClient:
    """Calls through the openai client's transport (retries, error types, timeouts) with the JSON body built
    here: the SDK's typed `create()` walks every message, tool schema and prompt token id through its
    TypedDict transform, which cost ~35 ms of CPU per call (half a fleet worker's CPU per rollout)."""

    def __init__(self, policy: PolicyEndpoint, *, request_token_ids: bool = True, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = -1, max_tokens: Optional[int] = None, max_retries: int = 2,
                 seed: Optional[int] = None, tool_call_regex: Optional[str] = None):
        self.policy, self.request_token_ids = policy, request_token_ids
        self.temperature, self.max_tokens, self.seed = temperature, max_tokens, seed
        self.top_p, self.top_k = top_p, top_k  # 1.0 and -1: off (the whole temperature-scaled distribution)
        self.tool_call_regex = tool_call_regex  # complete_tokens: sample only calls this regex matches
        self._client, self._no_retry = _shared_client(policy, max_retries)

    def close(self) -> None:
        """Nothing to release: the HTTP client is shared by the process's rollouts (and closed at exit)."""

    def _post(self, client, path: str, body: dict, extra: Optional[dict], rollout_id: str, timeout: float) -> dict:
        from openai._base_client import make_request_options

        return client.post(path, body=body, cast_to=object, options=make_request_options(
            extra_headers={"X-Klong-Rollout-Id": rollout_id}, extra_body=extra, timeout=timeout,
            security={"bearer_auth": True}))

    def complete_tokens(self, prompt_ids: list[int], *, timeout_s: float, rollout_id: str,
                        max_tokens: Optional[int] = None) -> TokenCompletion:
        """One sample from `/v1/completions` with a token-id prompt (vLLM): the sampled ids and logprobs.
        `max_tokens`: this call's cap (default: the client's)."""
        extra: dict = {"return_token_ids": True, "skip_special_tokens": False}
        if self.top_k not in (-1, 0):  # vLLM's extra: not in the OpenAI API
            extra["top_k"] = self.top_k
        if self.seed is not None:
            extra["seed"] = self.seed
        if self.tool_call_regex:
            extra["structured_outputs"] = {"regex": self.tool_call_regex}
        body = {"model": self.policy.model, "prompt": [int(i) for i in prompt_ids], "temperature": self.temperature,
                "top_p": self.top_p, "max_tokens": max_tokens or self.max_tokens, "logprobs": 0}
        resp = self._call(lambda client, timeout: self._post(client, "/completions", body, extra, rollout_id, timeout),
                          timeout_s)
        choice = _first_choice(resp, self.policy.model)
        ids, lps = choice.get("token_ids"), ((choice.get("logprobs") or {}).get("token_logprobs"))
        if ids is None or lps is None or len(lps) != len(ids):
            raise PolicyFailed(f"policy endpoint {self.policy.base_url} did not return the sampled token ids and "
                               "their logprobs (`return_token_ids`, vLLM >= 0.10): token-in/token-out needs a vLLM "
                               "server; use the chat API path (no model directory) for other endpoints")
        return TokenCompletion([int(i) for i in ids], [float(x) for x in lps], choice.get("text") or "",
                               choice.get("finish_reason") or "", choice.get("prompt_token_ids"))

    def _call(self, request: Callable[[Any, float], Any], timeout_s: float) -> Any:
        """Runs `request(client, timeout)`, mapping the client's errors onto ours."""
        import openai

        # Near the rollout's deadline the client must not retry a timed-out call (it would overrun it).
        client = self._client if timeout_s >= self.policy.request_timeout_s else self._no_retry
        try:
            return request(client, max(0.1, min(timeout_s, self.policy.request_timeout_s)))
        except openai.APITimeoutError as e:
            raise PolicyTimeout(f"policy {self.policy.model} at {self.policy.base_url} did not answer "
                                f"within {timeout_s:.1f} s") from e
        except openai.BadRequestError as e:
            if any(m in str(e).lower() for m in CONTEXT_ERROR_MARKERS):
                raise ContextLengthExceeded(str(e)[:500]) from e
            raise PolicyFailed(f"policy {self.policy.model} refused the request: {str(e)[:500]}") from e
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
            raise PolicyFailed(f"policy endpoint {self.policy.base_url}: {str(e)[:300]} "
                               "(check --base-url, --model and OPENAI_API_KEY)") from e
        except openai.APIError as e:  # connection errors, 429 and 5xx after the client's own retries
            raise TransientError(f"policy endpoint {self.policy.base_url}: {str(e)[:300]}") from e

    def complete(self, messages: list[dict], *, tools: list[dict], timeout_s: float, rollout_id: str) -> Completion:
        extra = {"return_token_ids": True, "return_tokens_as_token_ids": True} if self.request_token_ids else None
        if self.top_k not in (-1, 0):
            extra = {**(extra or {}), "top_k": self.top_k}
        body = {"model": self.policy.model, "messages": messages, "tools": tools, "tool_choice": "auto",
                "temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens, "logprobs": True}
        resp = self._call(lambda client, timeout: self._post(client, "/chat/completions", body, extra, rollout_id,
                                                             timeout), timeout_s)
        choice = _first_choice(resp, self.policy.model)
        msg = choice.get("message") or {}
        calls = [(c.get("id") or f"call-{i}", c["function"]["name"], c["function"].get("arguments") or "")
                 for i, c in enumerate(msg.get("tool_calls") or [])
                 if isinstance(c, dict) and isinstance(c.get("function"), dict)
                 and isinstance(c["function"].get("name"), str)]
        ids, lps = _tokens(choice)
        return Completion(msg.get("content") or "", calls, ids, lps, choice.get("finish_reason") or "")


def _first_choice(resp: Any, model: str) -> dict:
    """choices[0] of a completion response (JSON), or TransientError for a reply without one."""
    choices = resp.get("choices") if isinstance(resp, dict) else None
    if not choices or not isinstance(choices[0], dict):
        raise TransientError(f"policy {model} returned no choices")
    return choices[0]


def prune(messages: list[dict], n_prefix: int, ratio: float = 0.3) -> Optional[list[dict]]:
    """PaperBench's pruning with KLong's change: the first `n_prefix` messages (system, task, paper
    reading) always stay; of the rest, the oldest `ratio` (at least one message) go, and the kept part
    starts at an assistant or user message so no tool output loses the call it answers (as a last
    resort only the prefix is left). None when there is nothing left to drop."""
    head, rest = messages[:n_prefix], messages[n_prefix:]
    if not rest:
        return None
    start = max(1, int(len(rest) * ratio))
    while start < len(rest) and rest[start]["role"] == "tool":
        start += 1
    return head + rest[start:]
