"""The policy model: a tiny random-init Llama (tests; no download) or a real local causal LM (SmolLM2 imported
with `klong model import`, any transformers directory), and its checkpoints (a transformers directory +
the klong state that says which policy_version and dataset made them).

    model, info = load_model(cfg.model, max_positions=dataset.max_tokens, home=settings.home)
    hidden, head = body(model)(input_ids=ids).last_hidden_state, model.get_output_embeddings()
    save_weights(model, ckpt_dir, source=info.source)        # model.safetensors + config.json + tokenizer files

`model.name: tiny` builds a LlamaForCausalLM from the shape in the YAML (vocab 512, 2 layers of width 64 by
default), seeded by the run's seed, with max_position_embeddings = the dataset's max_tokens. Any other
name is a local directory, or NAME under HOME/models (trainer.config.model_path), that
`AutoModelForCausalLM.from_pretrained` loads with `local_files_only=True`; a klong checkpoint directory is
one, and its `klong_state.json` gives the policy_version the new run starts from. A checkpoint is what
vLLM and transformers load as they are: `save_pretrained` safetensors + config.json + generation config,
and the input directory's tokenizer files and chat template (`chat_template.jinja`, the tool-aware one
the server and the renderer use), copied, so a reload of the policy server reads the same template.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from schemas.errors import ConfigError
from trainer.config import ModelConfig, model_path

STATE_FILE = "klong_state.json"  # in every checkpoint directory: run, step, policy_version, dataset, position
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")


@dataclass(frozen=True)
class ModelInfo:
    source: Optional[Path]  # the directory it was loaded from (None: tiny)
    policy_version: int  # of the loaded weights
    vocab_size: int
    max_positions: int
    stand_in: bool  # the tiny random model or a checkpoint trained from it: token ids may be folded


def tiny_config(cfg: ModelConfig, max_positions: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                       max_position_embeddings=max_positions, tie_word_embeddings=False, attention_dropout=0.0,
                       bos_token_id=None, eos_token_id=None, pad_token_id=0)


def read_state(directory: Path | str) -> Optional[dict]:
    path = Path(directory) / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def load_model(cfg: ModelConfig, max_positions: int, seed: int = 0,
               home: Path | str = ".") -> tuple[torch.nn.Module, ModelInfo]:
    """Builds or loads the model (float32 or bfloat16 per model.dtype), on CPU; the engine moves it."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    dtype = getattr(torch, cfg.dtype)
    src = model_path(cfg.name, home)
    if src is None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = LlamaForCausalLM(tiny_config(cfg, max_positions)).to(dtype)
        return model, ModelInfo(None, cfg.policy_version or 0, cfg.vocab_size, max_positions, True)
    try:
        model = AutoModelForCausalLM.from_pretrained(src, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name: {src} cannot be loaded as a causal LM: {e}") from e
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and limit < max_positions:
        raise ConfigError(f"model.name: {src} takes {limit} positions, but the dataset's samples reach "
                          f"{max_positions} tokens (max_tokens): build the dataset with max_tokens <= {limit}")
    if getattr(model.config, "final_logit_softcapping", None):
        raise ConfigError(f"model.name: {src} post-processes its logits (final_logit_softcapping), which the "
                          "trainer's chunked log-probs (output layer applied to the last hidden states) do not")
    state = read_state(src) or {}
    stand_in = bool(state.get("stand_in", False))
    if cfg.fold_token_ids and not stand_in:
        raise ConfigError(f"model.fold_token_ids=true folds ids for the tiny stand-in only; model.name={cfg.name!r} "
                          "must read the token ids its tokenizer made (set model.fold_token_ids=false)")
    version = cfg.policy_version if cfg.policy_version is not None else state.get("policy_version", 0)
    return model, ModelInfo(src, version, model.get_output_embeddings().weight.shape[0], max_positions, stand_in)


def check_tokenizer(info: ModelInfo, manifest: dict) -> None:
    """A real model trains only on ids its own tokenizer and chat template made: the dataset's
    `counts.token_ids_from` fingerprint (core.chat) must be the model directory's. Unknown sources
    (rollouts recorded without a fingerprint) pass; the vocabulary range is checked by the reader either way."""
    source = manifest.get("counts", {}).get("token_ids_from") or ""
    if info.stand_in or not source:
        return
    from core.chat import ChatTokenizer

    try:
        mine = ChatTokenizer(info.source).fingerprint
    except ConfigError:  # no tokenizer.json / chat template next to the weights: nothing to compare
        return
    if source != mine:
        raise ConfigError(f"dataset {manifest['ref']} holds token ids from tokenizer {source[:19]}..., but model.name="
                          f"{info.source} has tokenizer {mine[:19]}... (its tokenizer.json + chat template): train the "
                          "model the dataset was recorded or built with (tokenizer=MODEL_DIR at build)")


def body(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer without its output layer (input_ids -> last_hidden_state, final norm applied)."""
    return model.base_model


def save_weights(model: torch.nn.Module, directory: Path, state_dict: Optional[dict] = None,
                 source: Optional[Path] = None) -> None:
    """config.json + model.safetensors + generation config (+ the source's tokenizer files and chat template)
    into `directory`: a transformers directory vLLM serves as it is."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, state_dict=state_dict)  # safetensors (the only format transformers 5 writes)
    for name in TOKENIZER_FILES if source else ():
        if (source / name).is_file() and not (directory / name).exists():
            shutil.copy2(source / name, directory / name)


def write_state(directory: Path, state: dict) -> None:
    tmp = directory / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
    tmp.rename(directory / STATE_FILE)
