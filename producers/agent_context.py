"""A rollout's context as token ids, kept on the client side (token-in/token-out against vLLM).

    ctx = TokenContext(ChatTokenizer(model_dir), tools=TOOLS)
    ids = ctx.observe({"role": "tool", "content": out}, step_idx=7, pinned=False)   # the ids this message adds
    turn = ctx.sample(client, step_idx=8, pinned=False, timeout_s=60, rollout_id=rid)  # one policy call
    turn.token_ids, turn.logprobs, turn.context_start, turn.prompt                  # what to record
    ctx.prune(0.3)                                                                  # after a context error
    ctx = TokenContext(chat, tools=TOOLS, limit=2048)   # the server's max_model_len: prune before overflowing

The model is given `concat(ids of the messages in context) ++ generation prompt` as a token-id prompt and
its sampled ids are appended exactly as they came: nothing is re-tokenized. For a new observation only
the ids the chat template adds for it are appended (`ChatTokenizer.added_ids`: the rendering with and
without it, checked append-only). An assistant step records, like an imported one (`core.chat`),
its whole message: the generation prompt ids (`<|im_start|>assistant\\n`), the sampled ids, and the ids
the template closes the turn with after them (`\\n` after a sampled `<|im_end|>`; `<|im_end|>\\n` when the
sample was cut by max_tokens), so the context stays well-formed chat text. Its logprobs are one per id: the
behaviour logprob for sampled ids, NaN for the ids the template added; `Turn.n_generation_prompt` and
`Turn.n_sampled` say which ids were sampled (recorded with the step: only those carry loss).

With `limit` (the server's `max_model_len`) a call whose prompt, its max_tokens (or at least one sampled id)
and the ids the template closes a cut turn with would not fit raises `ContextLengthExceeded` before it is sent,
so the runner prunes first: every recorded context, closed turn included, fits `limit` (a window the dataset
builder cuts along the contexts is at most `limit` tokens), and a sample is never cut by the context. Without
it the server decides (vLLM shortens max_tokens to what is left, then the closed turn is `limit` + 2 ids).

Pruning drops whole messages after the pinned prefix (`agent_policy.prune`) and keeps the ids of the rest
as they are, so the new context is still a concatenation of recorded steps: steps [0, P) ++ [c, k).
Every step records that c as `context_start`; the dataset builder compares it with a window's first step
to know where the window's context equals the generation context (`consumers.materialize.same_context`).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np

from core.chat import ChatTokenizer, TemplateError
from producers.agent_policy import ContextLengthExceeded, PolicyClient, parse_hermes, prune


@dataclass(frozen=True)
class Turn:
    text: str  # the sampled text (tool call markup included), as the template renders it back
    content: str  # the text before the first tool call (vLLM's hermes parser)
    tool_calls: list  # [(call id, name, arguments JSON)]
    token_ids: np.ndarray  # int32: generation prompt ++ sampled ++ template's end of turn
    logprobs: np.ndarray  # float32, one per id: NaN where the template, not the policy, put the id
    finish_reason: str
    context_start: int
    prompt: list  # the token-id prompt the policy was given
    n_generation_prompt: int = 0  # token_ids[n_generation_prompt : + n_sampled] are the sampled ids
    n_sampled: int = 0


class TokenContext:
    def __init__(self, chat: ChatTokenizer, tools: Sequence[dict], limit: Optional[int] = None):
        self.chat, self.tools, self.limit = chat, list(tools), limit
        self._closing_cut: Optional[int] = None  # ids the template closes a cut sample with (computed once)
        self.messages: list[dict] = []  # the messages in context, as the template renders them
        self.ids: list[np.ndarray] = []  # per message: its ids in the context
        self.steps: list[int] = []  # per message: its step_idx
        self.n_prefix = 0  # leading pinned messages (never pruned)

    @property
    def prompt_ids(self) -> list[int]:
        return np.concatenate(self.ids).tolist() if self.ids else []

    def context_start(self, step_idx: int) -> int:
        """The first step after the prefix in the context (a step about to be added: itself if none)."""
        return self.steps[self.n_prefix] if len(self.steps) > self.n_prefix else step_idx

    def _append(self, msg: dict, ids: np.ndarray, step_idx: int, pinned: bool) -> None:
        if pinned and self.n_prefix == len(self.messages):
            self.n_prefix += 1
        self.messages.append(msg)
        self.ids.append(np.asarray(ids, dtype=np.int32))
        self.steps.append(step_idx)

    def observe(self, msg: dict, *, step_idx: int, pinned: bool) -> np.ndarray:
        """A system/user/tool message: the ids the template adds for it (recorded as the step's token_ids)."""
        ids = self.chat.added_ids(self.messages, [msg], self.tools)
        self._append(msg, ids, step_idx, pinned)
        return ids

    def sample(self, client: PolicyClient, *, step_idx: int, pinned: bool, timeout_s: float,
               rollout_id: str) -> Turn:
        """One policy call on the context; the assistant message joins the context (see the docstring)."""
        start = self.context_start(step_idx)
        header = self.chat.generation_prompt(self.messages, self.tools)
        prompt = self.prompt_ids + header.tolist()
        if self.limit is None:
            out = client.complete_tokens(prompt, timeout_s=timeout_s, rollout_id=rollout_id)
        else:
            room = self.limit - len(prompt) - self.closing_cut()  # sampled ids that still close within limit
            if room < (client.max_tokens or 1):
                raise ContextLengthExceeded(f"context limit {self.limit}: a prompt of {len(prompt)} ids leaves "
                                            f"{room} for a reply of up to {client.max_tokens or 1} and its closing ids")
            out = client.complete_tokens(prompt, timeout_s=timeout_s, rollout_id=rollout_id,
                                         max_tokens=client.max_tokens or room)
        sampled = np.asarray(out.token_ids, dtype=np.int32)
        stopped = len(sampled) > 0 and self.chat.eos_id is not None and int(sampled[-1]) == self.chat.eos_id
        text = self.chat.decode(sampled[:-1] if stopped else sampled)
        msg = {"role": "assistant", "content": text}  # the sampled text as it is: tool calls are not re-rendered
        before = self.chat.render(self.messages, self.tools, add_generation_prompt=True) + text
        after = self.chat.render(self.messages + [msg], self.tools)
        if not after.startswith(before):
            raise TemplateError("the chat template does not render an assistant message as its text verbatim: "
                                "the sampled ids cannot be closed into a turn")
        closing = self.chat.encode(after[len(before):])
        if stopped and len(closing) and int(closing[0]) == self.chat.eos_id:
            closing = closing[1:]  # the sampled end-of-turn id is the template's: keep the sampled one
        ids = np.concatenate([header, sampled, closing]).astype(np.int32)
        lps = np.concatenate([np.full(len(header), math.nan), np.asarray(out.logprobs, np.float64),
                              np.full(len(closing), math.nan)]).astype(np.float32)
        content, calls = parse_hermes(text)
        self._append(msg, ids, step_idx, pinned)
        return Turn(text, content, calls, ids, lps, out.finish_reason, start, prompt, len(header), len(sampled))

    def closing_cut(self) -> int:
        """How many ids the template appends to close an assistant turn cut before its end-of-turn id."""
        if self._closing_cut is None:
            user = [{"role": "user", "content": "x"}]
            before = self.chat.render(user, self.tools, add_generation_prompt=True) + "y"
            after = self.chat.render(user + [{"role": "assistant", "content": "y"}], self.tools)
            self._closing_cut = len(self.chat.encode(after[len(before):])) if after.startswith(before) else 2
        return self._closing_cut

    def prune(self, ratio: float) -> bool:
        """Drops the oldest `ratio` of the messages after the prefix; False when nothing is left to drop."""
        kept = prune(self.messages, self.n_prefix, ratio)
        if kept is None:
            return False
        keep = {id(m) for m in kept}
        rows = [i for i, m in enumerate(self.messages) if id(m) in keep]
        self.messages = [self.messages[i] for i in rows]
        self.ids = [self.ids[i] for i in rows]
        self.steps = [self.steps[i] for i in rows]
        return True

    def __len__(self) -> int:
        return sum(len(x) for x in self.ids)


_LOAD = threading.Lock()


def chat_tokenizer(model_dir: str) -> ChatTokenizer:
    """One ChatTokenizer per model directory, shared by the rollouts of a process (loading takes ~1 s). Loaded
    under a lock: rollouts start in many threads at once, and transformers' lazy imports are not thread-safe."""
    with _LOAD:
        return _cached(str(model_dir))


@lru_cache(maxsize=4)
def _cached(model_dir: str) -> ChatTokenizer:
    return ChatTokenizer(model_dir)
