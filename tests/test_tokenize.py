"""Tokenizers for text-only steps: built-in bytes, a local tokenizer.json, clear errors, no downloads."""

import hashlib

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from core.tokenize import ByteTokenizer, HFTokenizer, fill_token_ids, load_tokenizer
from schemas.errors import ConfigError, ValidationError


@pytest.fixture
def tokenizer_json(tmp_path):
    """A tiny word-level tokenizer.json written locally (the same file format as any HF model's)."""
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "run": 3, "tests": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    return path


@pytest.mark.parametrize("text, ids", [
    ("", []),
    ("hi", [104, 105]),
    ("é€", [0xC3, 0xA9, 0xE2, 0x82, 0xAC]),
])
def test_byte_tokenizer(text, ids):
    tok = load_tokenizer("bytes")
    assert isinstance(tok, ByteTokenizer) and tok.fingerprint == "bytes"
    (out,) = tok.encode_batch([text])
    assert out.dtype == np.int32 and out.tolist() == ids
    assert tok.decode(out) == text


def test_hf_tokenizer_from_file_and_directory(tokenizer_json):
    for spec in (tokenizer_json, str(tokenizer_json.parent)):
        tok = load_tokenizer(spec)
        assert isinstance(tok, HFTokenizer)
        out = tok.encode_batch(["hello world", "run the tests", ""])
        assert [o.tolist() for o in out] == [[1, 2], [3, 0, 4], []]
        assert all(o.dtype == np.int32 for o in out)
        assert tok.fingerprint == "sha256:" + hashlib.sha256(tokenizer_json.read_bytes()).hexdigest()
        assert tok.decode([1, 2]) == "hello world"


def test_missing_or_broken_tokenizer_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="nope.json does not exist"):
        load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer(tmp_path)  # a directory without tokenizer.json
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot be loaded"):
        load_tokenizer(bad)


def test_fill_token_ids_encodes_only_missing_steps():
    recorded = np.array([7, 8, 9], dtype=np.int32)
    out = fill_token_ids(ByteTokenizer(), ["ab", "ignored", "c"], [None, recorded, None])
    assert [o.tolist() for o in out] == [[97, 98], [7, 8, 9], [99]]
    with pytest.raises(ValidationError, match="one of each per step"):
        fill_token_ids(ByteTokenizer(), ["a"], [])
