"""`klong model import`: a GGUF file or a local transformers directory -> `HOME/models/NAME`, a directory
that the trainer (`model.name=DIR`), the renderer (`core.chat`) and vLLM (`--model DIR`) all read.

    path = import_model("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2", home / "models")
    resolve_model_dir("smollm2", home)          # NAME under HOME/models, or a directory path -> Path

A GGUF file is read by transformers through the `gguf` package and dequantized to float32; transformers
refuses to save a model it loaded from GGUF ("not serializable") although the weights are plain tensors,
so the quantizer and `quantization_config` are dropped before `save_pretrained`. A transformers directory
is copied as it is (weights, config, tokenizer files).

The chat template: the model directory gets a tool-aware one, written to `chat_template.jinja` (which
transformers' `apply_chat_template` reads, and vLLM is pointed at with `--chat-template`), so the server
and the renderer use the identical text. A template that already handles `tools` is kept; a plain ChatML
template (SmolLM2's drops `tools` and `tool_calls`) is replaced by `templates/chatml_tools.jinja`
(Hermes-style `<tools>` block and `<tool_call>` JSON, byte-identical to the stock one without tools), with
the stock default system prompt kept; any other template needs `chat_template=FILE`.

The directory is written under a temporary name and renamed, so it is there whole or not at all.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Optional

from schemas.errors import ConfigError

TEMPLATE_FILE = Path(__file__).parent / "templates" / "chatml_tools.jinja"
CHAT_TEMPLATE = "chat_template.jinja"  # in the model directory
INFO_FILE = "klong_model.json"  # what it was imported from
_SMOL_DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # used with fullmatch: `$` would pass "name\n"


def resolve_model_dir(spec: str | Path, home: Optional[Path] = None) -> Path:
    """A model given by NAME (HOME/models/NAME) or by directory path; a clear error when it is neither."""
    path = Path(spec)
    if path.is_dir():
        return path.resolve()
    if home is not None and _NAME.fullmatch(str(spec)) and (Path(home) / "models" / str(spec)).is_dir():
        return (Path(home) / "models" / str(spec)).resolve()
    where = f" nor a model under {Path(home) / 'models'}" if home is not None else ""
    raise ConfigError(f"model {spec!r} is not a directory{where}: import one with "
                      "`klong model import FILE.gguf --name NAME`")


def tool_template(stock: Optional[str]) -> str:
    """The tool-aware template for a model whose stock template is `stock` (see the module docstring)."""
    ours = TEMPLATE_FILE.read_text()
    if stock and "tools" in stock:
        return stock
    if stock and "<|im_start|>" not in stock:
        raise ConfigError("the model's chat template is not ChatML and does not render tools: give a "
                          "tool-aware template with --chat-template FILE")
    default = re.search(r"<\|im_start\|>system(?:\\n|\n)(.*?)<\|im_end\|>", stock or "", re.S)
    if default is None:  # no default system prompt: drop that branch
        return re.sub(r"\{%- if loop.first and messages\[0\]\['role'\] != 'system' -%\}.*?\{%- endif -%\}\n", "",
                      ours, count=1, flags=re.S)
    text = default.group(1).replace("\\'", "'").replace("'", "\\'").replace("\n", "\\n")  # a jinja string literal
    return ours.replace(_SMOL_DEFAULT, text, 1)


def import_model(source: str | Path, name: str, models_dir: Path, chat_template: Optional[Path] = None,
                 force: bool = False) -> Path:
    """Converts/copies `source` (a .gguf file or a transformers directory) to `models_dir/name`."""
    source = Path(source)
    if not _NAME.fullmatch(name):
        raise ConfigError(f"--name {name!r}: use letters, digits, '.', '_' or '-' (a directory name)")
    if not source.exists():
        raise ConfigError(f"{source} does not exist: give a .gguf file or a transformers model directory")
    if source.is_file() and source.suffix != ".gguf":
        raise ConfigError(f"{source} is not a .gguf file: give a GGUF file or a transformers model directory")
    if source.is_dir() and not (source / "config.json").is_file():
        raise ConfigError(f"{source} has no config.json: not a transformers model directory")
    target = models_dir / name
    if target.exists() and not force:
        raise ConfigError(f"{target} exists already: pick another --name or pass --force to replace it")
    tmp = models_dir / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    models_dir.mkdir(parents=True, exist_ok=True)
    try:
        stock = _convert_gguf(source, tmp) if source.is_file() else _copy_dir(source, tmp)
        template = chat_template.read_text() if chat_template else tool_template(stock)
        _install_template(tmp, template)
        (tmp / INFO_FILE).write_text(json.dumps({"source": str(source.resolve()), "name": name}, indent=1) + "\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def _convert_gguf(path: Path, out: Path) -> Optional[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ConfigError(f"{path} cannot be read as a GGUF causal LM: {e}") from e
    model.hf_quantizer = None  # plain float32 tensors now; transformers refuses to save a "quantized" model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return tok.chat_template


def _copy_dir(src: Path, out: Path) -> Optional[str]:
    shutil.copytree(src, out, ignore=shutil.ignore_patterns(".*", "__pycache__"))
    if (out / CHAT_TEMPLATE).is_file():
        return (out / CHAT_TEMPLATE).read_text()
    cfg = out / "tokenizer_config.json"
    return json.loads(cfg.read_text()).get("chat_template") if cfg.is_file() else None


def _install_template(directory: Path, template: str) -> None:
    """chat_template.jinja is the one template; a copy inside tokenizer_config.json would compete with it."""
    (directory / CHAT_TEMPLATE).write_text(template)
    cfg = directory / "tokenizer_config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text())
        if data.pop("chat_template", None) is not None:
            cfg.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
