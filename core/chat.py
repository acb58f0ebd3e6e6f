"""Chat messages -> the exact token ids a model directory's chat template gives, split per message.

    chat = ChatTokenizer("HOME/models/smollm2")                    # tokenizer.json + chat_template.jinja
    spans = chat.message_spans(messages, tools)                    # int32 ids per message, concatenated ==
    np.concatenate(spans) == chat.encode(chat.render(messages, tools))   # apply_chat_template(messages, tools)
    ids = chat.added_ids(history, [tool_message], tools)           # what a new message adds to a live context
    header = chat.generation_prompt(history, tools)               # `<|im_start|>assistant\\n` before a sample

How a rendering is split: the cut before message i is where `render(messages[:i])` ends. So every span is
one whole message in its markup: an assistant span is its role header (the generation prompt it was
prompted with), what the model wrote (text, tool calls) and the end-of-turn markup, and a window that
starts at any message is well-formed ChatML. Every partial rendering must be a prefix of the whole one
(checked), and the whole rendering is tokenized once: a cut that falls inside a token is an error, so the
spans concatenated are exactly `apply_chat_template(messages, tools=tools)`. The token-in/token-out runner
(`producers.agent`) records its assistant steps the same way: the header ids, the sampled ids, the template's
end-of-turn ids. Only what the assistant produced carries loss: `assistant_markup` gives the header and closing
ids the dataset builder leaves out of an assistant span's loss (`consumers.sampled`).

`fingerprint` = sha256 of tokenizer.json and the template: rollouts whose ids come from different
vocabularies or templates never share a dataset (`consumers.materialize`). Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from schemas.errors import ConfigError, ValidationError

TEMPLATE_FILE = "chat_template.jinja"


class TemplateError(ValidationError):
    """A conversation cannot be split into per-message token spans with this template."""


class ChatTokenizer:
    """A model directory's tokenizer and chat template (transformers, local files only)."""

    def __init__(self, model_dir: str | Path):
        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        if not (model_dir / "tokenizer.json").is_file():
            raise ConfigError(f"{model_dir} is not a model directory with a tokenizer.json "
                              "(import one with `klong model import FILE.gguf --name NAME`)")
        try:
            self.tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{model_dir}: the tokenizer cannot be loaded: {e}") from e
        template = self.tok.chat_template
        if not template:
            raise ConfigError(f"{model_dir} has no chat template (chat_template.jinja): import the model with "
                              "`klong model import` to install one")
        self.path = model_dir
        self.template = template
        # A Rust tokenizer called from two threads at once fails ("Already borrowed"): rollouts share one.
        self._lock = threading.RLock()
        self.eos_id: Optional[int] = self.tok.eos_token_id
        self.vocab_size = len(self.tok)
        digest = hashlib.sha256((model_dir / "tokenizer.json").read_bytes())
        digest.update(b"\0" + template.encode())
        self.fingerprint = "sha256:" + digest.hexdigest()
        self._markup: Optional[tuple[np.ndarray, np.ndarray]] = None

    # -- plain text ----------------------------------------------------------------------------------

    def encode(self, text: str) -> np.ndarray:
        """int32 ids of `text`, no special tokens added (markup in the text is read as special tokens)."""
        with self._lock:
            return np.asarray(self.tok(text, add_special_tokens=False)["input_ids"], dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        with self._lock:
            out = self.tok(list(texts), add_special_tokens=False)["input_ids"]
        return [np.asarray(ids, dtype=np.int32) for ids in out]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        with self._lock:
            return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    # -- the template --------------------------------------------------------------------------------

    def render(self, messages: Sequence[dict], tools: Optional[Sequence[dict]] = None,
               add_generation_prompt: bool = False) -> str:
        try:
            with self._lock:
                return self.tok.apply_chat_template(list(messages), tools=list(tools) if tools else None, tokenize=False,
                                                    add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja raises TemplateError, TypeError, KeyError, ... on odd messages
            raise TemplateError(f"the chat template of {self.path} cannot render these messages: "
                                f"{type(e).__name__}: {e}") from e

    def apply(self, messages: Sequence[dict], tools: Optional[Sequence[dict]] = None,
              add_generation_prompt: bool = False) -> np.ndarray:
        """`apply_chat_template(messages, tools=tools)` as int32 ids (the reference the spans must equal)."""
        return self.encode(self.render(messages, tools, add_generation_prompt))

    def message_spans(self, messages: Sequence[dict], tools: Optional[Sequence[dict]] = None) -> list[np.ndarray]:
        """Token ids per message (see the module docstring); concatenated == apply(messages, tools)."""
        full = self.render(messages, tools)
        cuts = [0]
        for i in range(1, len(messages)):
            part = self.render(messages[:i], tools)
            if not full.startswith(part) or len(part) < cuts[-1]:
                raise TemplateError(f"message {i}: the template renders the messages before it differently once it "
                                    "follows (the rendering is not append-only), so it has no span of its own")
            cuts.append(len(part))
        with self._lock:
            enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int32)
        starts = np.array([a for a, _ in enc["offset_mapping"]] + [len(full)], dtype=np.int64)
        bounds = []
        for i, c in enumerate(cuts):
            k = int(np.searchsorted(starts, c))  # first token starting at or after the cut
            if k > 0 and enc["offset_mapping"][k - 1][1] > c:
                raise TemplateError(f"message {i}: a token of the rendering straddles where the message starts, so "
                                    "its tokens depend on the message before it")
            bounds.append(k)
        bounds.append(len(ids))
        return [ids[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def added_text(self, history: Sequence[dict], new: Sequence[dict], tools: Optional[Sequence[dict]] = None,
                   add_generation_prompt: bool = False, history_generation_prompt: bool = False) -> str:
        """The text the template adds after `history` for the messages `new` (checked append-only)."""
        before = self.render(history, tools, history_generation_prompt) if history else ""
        after = self.render(list(history) + list(new), tools, add_generation_prompt)
        if not after.startswith(before):
            raise TemplateError("the template renders the earlier messages differently once new ones follow: "
                                "a live token context cannot be extended by appending")
        return after[len(before):]

    def generation_prompt(self, history: Sequence[dict], tools: Optional[Sequence[dict]] = None) -> np.ndarray:
        """The ids the template puts after `history` to prompt an assistant turn."""
        return self.encode(self.added_text(history, [], tools, add_generation_prompt=True))

    def assistant_markup(self) -> tuple[np.ndarray, np.ndarray]:
        """(header, closing) int32 ids the template puts around an assistant message's content: the generation
        prompt (`<|im_start|>assistant\\n`) and the end of turn (`<|im_end|>\\n`). Neither is the policy's output
        (`consumers.sampled`), except the end-of-turn id when the model sampled it."""
        if self._markup is None:
            history, probe = [{"role": "user", "content": "Hi."}], "Hello."
            header = self.generation_prompt(history)
            text = self.added_text(history, [{"role": "assistant", "content": probe}], history_generation_prompt=True)
            if not text.startswith(probe):
                raise TemplateError(f"the chat template of {self.path} does not render an assistant message's "
                                    "content verbatim after its generation prompt")
            self._markup = (header, self.encode(text[len(probe):]))
        return self._markup

    def added_ids(self, history: Sequence[dict], new: Sequence[dict], tools: Optional[Sequence[dict]] = None,
                  add_generation_prompt: bool = False) -> np.ndarray:
        """Token ids the messages `new` add to a context that rendered `history` (ChatML: each message
        starts at a special token, so encoding the added text alone gives the ids it has in the whole)."""
        return self.encode(self.added_text(history, new, tools, add_generation_prompt))


def to_openai(role: str, content: str, tool_calls: Sequence[Any] = (), tool_call_id: Optional[str] = None) -> dict:
    """A chat message for the template from recorded parts (tool calls as (name, arguments-json) pairs)."""
    msg: dict = {"role": role, "content": content}
    if tool_calls:
        msg["content"] = content or None
        msg["tool_calls"] = [{"id": cid or f"call_{k}", "type": "function", "function": {"name": n, "arguments": a}}
                             for k, (n, a, cid) in enumerate(tool_calls)]
    if tool_call_id is not None:
        msg["tool_call_id"] = tool_call_id
    return msg
