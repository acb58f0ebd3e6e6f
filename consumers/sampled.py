"""Which ids of an assistant step the policy sampled: the only ids that carry loss.

An assistant step's token_ids are its whole message in the context: the generation prompt the chat template
opened the turn with (`<|im_start|>assistant\\n`), the ids the policy sampled (its end-of-turn id included
when it stopped), and the ids the template closes the turn with (`\\n` after a sampled `<|im_end|>`, or
`<|im_end|>\\n` after a sample cut by max_tokens or the context). The header and the closing ids belong to
the context, not to the policy's output: they stay in every window's input (well-formed chat text) and
carry no loss, as in verl and TRL.

    lo, hi = sampled_ranges(steps, rows, values, logprobs, offsets, markup)   # int64 [n] each: ids [lo, hi)

The range of each step, first rule that applies:

1. recorded: `n_generation_prompt` and `n_sampled` (the runner, `producers.agent_context`; an import that
   knows them) -> [n_generation_prompt, n_generation_prompt + n_sampled);
2. recorded ids with behaviour logprobs (runners before those fields put NaN exactly on the template's
   ids) -> from the first to the last id with a logprob;
3. ids from a chat template (`markup`: a model directory's `ChatTokenizer`; text-only imports rendered at
   build time, imports with ids but no counts): a leading generation prompt is out; a trailing closing is out,
   except its end-of-turn id when the step did not end by `finish_reason: length` (a finished message's
   `<|im_end|>` was the model's to sample: verl and TRL train it too);
4. otherwise (content tokenized alone, no markup: `bytes`, a tokenizer.json) -> the whole step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class Markup:
    """What a chat template puts around an assistant message's content (core.chat.ChatTokenizer)."""

    header: np.ndarray  # int32: the generation prompt, `<|im_start|>assistant\n`
    closing: np.ndarray  # int32: after the content, `<|im_end|>\n`
    eos_id: Optional[int]  # the end-of-turn id the model samples to stop


def markup_of(tokenizer) -> Optional[Markup]:
    """The markup of a ChatTokenizer (None for tokenizers that encode content alone)."""
    fn = getattr(tokenizer, "assistant_markup", None)
    if fn is None:
        return None
    header, closing = fn()
    return Markup(header, closing, tokenizer.eos_id)


def sampled_ranges(steps: dict, rows: np.ndarray, values: np.ndarray, logprobs: Optional[np.ndarray],
                   offsets: np.ndarray, markup: Optional[Markup]) -> tuple[np.ndarray, np.ndarray]:
    """Step rows `rows` of a step table (`consumers.dataset_inputs.step_table`), whose ids are
    values[offsets[k]:offsets[k+1]] (logprobs alike, NaN where none) -> (lo, hi) int64 [len(rows)]: the sampled
    ids of step k are its ids [lo, hi). Observation steps get (0, 0): they carry no loss anyway."""
    n = np.diff(offsets).astype(np.int64)
    lo, hi = np.zeros(len(rows), np.int64), n.copy()
    asst = steps["is_asst"][rows]
    hi[~asst] = 0
    n_gp, n_s = steps["n_generation_prompt"][rows], steps["n_sampled"][rows]
    recorded = asst & (n_s >= 0) & ~steps["text_only"][rows]
    lo[recorded] = np.minimum(n_gp[recorded], n[recorded])
    hi[recorded] = np.minimum(n_gp[recorded] + n_s[recorded], n[recorded])
    todo = asst & ~recorded & (n > 0)
    if logprobs is not None and todo.any():  # rule 2: the span of ids with a behaviour logprob
        valid = ~np.isnan(logprobs)
        pos = np.arange(len(values), dtype=np.int64)
        k = np.flatnonzero(todo)
        starts = offsets[:-1][k]
        big = np.iinfo(np.int64).max  # a neutral sentinel ends each array: reduceat then takes every start
        first = np.minimum.reduceat(np.append(np.where(valid, pos, big), big), offsets[:-1])[k]
        last = np.maximum.reduceat(np.append(np.where(valid, pos, -1), -1), offsets[:-1])[k]
        has = last >= 0
        lo[k[has]] = first[has] - starts[has]
        hi[k[has]] = last[has] + 1 - starts[has]
        todo[k[has]] = False
    if markup is not None and todo.any():  # rule 3: the template's markup around the content
        h, c = markup.header, markup.closing
        eos_first = len(c) > 0 and markup.eos_id is not None and int(c[0]) == markup.eos_id
        cut = steps["cut"][rows]
        for k in np.flatnonzero(todo).tolist():
            ids = values[offsets[k]:offsets[k + 1]]
            a = len(h) if len(h) and len(ids) >= len(h) and np.array_equal(ids[:len(h)], h) else 0
            b = len(ids)
            if len(c) and len(ids) - a >= len(c) and np.array_equal(ids[len(ids) - len(c):], c):
                b = len(ids) - len(c) + (1 if eos_first and not cut[k] else 0)
            lo[k], hi[k] = a, b
    return lo, hi


def temperatures(steps: dict, rows: np.ndarray) -> np.ndarray:
    """float32 [len(rows)]: the temperature each step was sampled at, as the trainer divides logits by it.
    Unknown (older events, imports): 1.0, the API default. 0 (greedy) samples no distribution: 1.0 too (vLLM's
    processed logprobs of a greedy step are the raw ones)."""
    t = np.asarray(steps["temperature"][rows], np.float64)
    return np.where(np.isnan(t) | (t <= 0), 1.0, t).astype(np.float32)
