"""The judge's chat endpoint: one OpenAI-compatible client with our own retries, errors decided by type.

    client = ChatClient(GraderConfig(base_url="http://vllm:8000/v1", model="openai/gpt-oss-120b"))
    c = client.complete([{"role": "user", "content": "..."}])   # Completion(text, prompt_tokens, ...)

Errors, decided by type: timeouts, connection errors, 408/409/429 and 5xx are transient and retried
with exponential backoff and jitter (honouring Retry-After) up to `max_attempts`, then
`EndpointError`; 400/422 (e.g. a prompt over the context window) make that leaf invalid; 401/403/404
(bad key, unknown model or URL) raise `EndpointConfigError`, which stops the worker with nothing lost.
The API key comes from `$OPENAI_API_KEY` (or none: vLLM needs none) and is never logged.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Callable, Optional

import openai

from schemas.errors import TerminalError, TransientError

log = logging.getLogger("klong.judge")


class EndpointError(TransientError):
    """The model endpoint kept failing (timeouts, 429, 5xx) after every retry."""


class EndpointConfigError(TerminalError):
    """The endpoint refuses us for a reason retrying cannot fix: bad key, unknown model, wrong URL."""


@dataclass(frozen=True)
class GraderConfig:
    base_url: str
    model: str
    timeout_s: float = 300.0  # per call: a reasoning judge can take minutes on a long prompt
    max_attempts: int = 6
    backoff_min_s: float = 0.5
    backoff_max_s: float = 30.0
    max_paper_chars: int = 150_000
    max_files_chars: int = 120_000
    max_file_chars: int = 40_000
    max_tokens: Optional[int] = None  # completion limit sent to the endpoint (None: the server's default)
    temperature: Optional[float] = None
    api_key_env: str = "OPENAI_API_KEY"


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    attempts: int


_TRANSIENT_STATUS = {408, 409, 429}


class ChatClient:
    """One OpenAI-compatible client shared by all grading threads; retries are ours, not the SDK's."""

    def __init__(self, cfg: GraderConfig, sleep: Callable[[float], None] = time.sleep):
        self.cfg, self._sleep = cfg, sleep
        # vLLM accepts any key; the SDK insists on one. Never logged.
        key = os.environ.get(cfg.api_key_env) or "EMPTY"
        self._client = openai.OpenAI(base_url=cfg.base_url, api_key=key, max_retries=0, timeout=cfg.timeout_s)

    def close(self) -> None:
        self._client.close()

    def complete(self, messages: list[dict]) -> Completion:
        cfg = self.cfg
        extra = {k: v for k, v in (("max_tokens", cfg.max_tokens), ("temperature", cfg.temperature)) if v is not None}
        for attempt in range(1, cfg.max_attempts + 1):
            try:
                resp = self._client.chat.completions.create(model=cfg.model, messages=messages, **extra)
                if not getattr(resp, "choices", None):  # e.g. a proxy's HTML page parsed as a string
                    raise _Garbage(f"reply is not a chat completion: {str(resp)[:200]!r}")
                usage = getattr(resp, "usage", None)
                return Completion(resp.choices[0].message.content or "", getattr(usage, "prompt_tokens", 0) or 0,
                                  getattr(usage, "completion_tokens", 0) or 0, attempt)
            except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
                raise EndpointConfigError(f"{cfg.base_url} refused model {cfg.model!r}: {_describe(e)}") from e
            except (openai.BadRequestError, openai.UnprocessableEntityError):
                raise
            except (openai.APIConnectionError, openai.APIResponseValidationError, _Garbage, ValueError) as e:
                error, wait = e, None
            except openai.APIStatusError as e:
                if e.status_code < 500 and e.status_code not in _TRANSIENT_STATUS:
                    raise
                error, wait = e, _retry_after(e)
            if attempt == cfg.max_attempts:
                raise EndpointError(f"{cfg.base_url}: gave up after {attempt} attempts: {_describe(error)}") from error
            backoff = min(cfg.backoff_max_s, cfg.backoff_min_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            delay = min(cfg.backoff_max_s, wait) if wait is not None else backoff
            log.debug("judge endpoint: %s; retry %d in %.2fs", _describe(error), attempt, delay)
            self._sleep(delay)
        raise AssertionError("unreachable")


class _Garbage(Exception):
    """A 200 reply that is not a chat completion."""


def _describe(e: Exception) -> str:
    status = getattr(e, "status_code", None)
    text = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
    return f"{type(e).__name__}" + (f" {status}" if status else "") + f": {text}"


def _retry_after(e: Exception) -> Optional[float]:
    headers = getattr(getattr(e, "response", None), "headers", None) or {}
    try:
        value = float(headers.get("retry-after", ""))
    except ValueError:
        return None
    return value if value >= 0 else None
