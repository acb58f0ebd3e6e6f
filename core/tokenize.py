"""Tokenizers for text-only steps (imported trajectories carry content but no token_ids).

`load_tokenizer("bytes")` gives the built-in UTF-8 byte tokenizer (ids 0..255, for tests and demos);
`load_tokenizer("path/to/tokenizer.json")` (or a directory holding one) loads a Hugging Face
`tokenizers` file from local disk; a model directory with a chat template (`klong model import`) gives a
`core.chat.ChatTokenizer`, which renders whole conversations with the template instead (the dataset
builder and the importer use its per-message spans); nothing is ever downloaded. Each tokenizer has a `fingerprint`
(the spec, or the file's sha256) for dataset manifests: same fingerprint, same tokens. Only the
step content is encoded, without special tokens or a chat template: steps are concatenated later,
and role markers are the scaffold's business, recorded in the content when it wants them.

    >>> [a.tolist() for a in load_tokenizer("bytes").encode_batch(["hi", "é"])]
    [[104, 105], [195, 169]]
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Protocol, Sequence

import numpy as np

from schemas.errors import ConfigError, ValidationError


class Tokenizer(Protocol):
    fingerprint: str  # identifies the vocabulary: goes into dataset manifests

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:  # int32 [n_tokens] per text
        ...


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocabulary of 256). Deterministic, dependency-free."""

    fingerprint = "bytes"
    vocab_size = 256

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int32) for t in texts]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return np.asarray(ids, dtype=np.uint8).tobytes().decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizer.json`, read from local disk through the `tokenizers` package."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _HF  # imported here: only this class needs it

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(f"tokenizer file {path} does not exist: give a local tokenizer.json "
                              "(nothing is downloaded) or 'bytes'")
        try:
            self._tok = _HF.from_file(str(path))
        except Exception as e:  # the tokenizers package raises a bare Exception on a malformed file
            raise ConfigError(f"tokenizer file {path} cannot be loaded: {e}") from e
        self.path = path
        self.fingerprint = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
        self.vocab_size = self._tok.get_vocab_size()

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """"bytes" -> ByteTokenizer; a model directory with a chat template -> `core.chat.ChatTokenizer`
    (messages rendered with the template); any other path is a tokenizer.json (or its directory)."""
    if str(spec) == "bytes":
        return ByteTokenizer()
    if is_model_dir(spec):
        from core.chat import ChatTokenizer

        return ChatTokenizer(spec)
    return HFTokenizer(spec)


def is_model_dir(spec: str | Path) -> bool:
    """A directory holding tokenizer.json and a chat template (chat_template.jinja or in tokenizer_config)."""
    import json

    path = Path(spec)
    if not (path / "tokenizer.json").is_file():
        return False
    if (path / "chat_template.jinja").is_file():
        return True
    cfg = path / "tokenizer_config.json"
    return cfg.is_file() and bool(json.loads(cfg.read_text()).get("chat_template"))


def fill_token_ids(tokenizer: Tokenizer, contents: Sequence[str],
                   token_ids: Sequence[Optional[np.ndarray]]) -> list[np.ndarray]:
    """Keeps the steps' recorded token_ids and encodes, in one batch, only the steps without them."""
    if len(contents) != len(token_ids):
        raise ValidationError(f"{len(contents)} contents but {len(token_ids)} token_ids: one of each per step")
    missing = [i for i, t in enumerate(token_ids) if t is None]
    encoded = tokenizer.encode_batch([contents[i] for i in missing]) if missing else []
    out = [None if t is None else np.asarray(t, dtype=np.int32) for t in token_ids]
    for i, ids in zip(missing, encoded):
        out[i] = ids
    return out  # type: ignore[return-value]
