"""`klong model import`: the real SmolLM2 GGUF -> a transformers directory with a tool-aware template."""

from __future__ import annotations

import json
import re

import pytest

from klong.cli import main
from schemas.errors import ConfigError
from trainer.model_import import CHAT_TEMPLATE, TEMPLATE_FILE, resolve_model_dir

TOOLS = [{"type": "function", "function": {"name": "bash", "description": "run a shell command",
                                           "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}},
                                                          "required": ["cmd"]}}}]
CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
    [{"role": "user", "content": "list"}, {"role": "assistant", "content": "ok"},
     {"role": "tool", "content": "a.txt\nb.txt"}, {"role": "assistant", "content": "two files"}],
]


@pytest.fixture(scope="module")
def tokenizers(smollm2_gguf, smollm2_dir):
    from transformers import AutoTokenizer

    stock = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    return stock, AutoTokenizer.from_pretrained(smollm2_dir)


def test_import_gguf_writes_a_float32_transformers_dir_that_generates(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (smollm2_dir / "model.safetensors").is_file() and (smollm2_dir / "tokenizer.json").is_file()
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["dtype"] == "float32" and "quantization_config" not in config
    assert (smollm2_dir / CHAT_TEMPLATE).read_text() == TEMPLATE_FILE.read_text()
    assert "chat_template" not in json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    reply = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply, reply  # dequantized weights that still know things


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_template_is_the_stock_one_without_tools(tokenizers, conversation, generation_prompt):
    stock, ours = tokenizers
    kw = dict(tokenize=False, add_generation_prompt=generation_prompt)
    assert ours.apply_chat_template(conversation, **kw) == stock.apply_chat_template(conversation, **kw)


@pytest.mark.parametrize("system", [None, "Be brief."])
def test_template_renders_tools_and_tool_calls(tokenizers, system):
    _, ours = tokenizers
    calls = [{"id": "c1", "type": "function", "function": {"name": "bash", "arguments": '{"cmd": "ls"}'}},
             {"id": "c2", "type": "function", "function": {"name": "bash", "arguments": {"cmd": "pwd"}}}]
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": "look around"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c1", "content": "a.txt"}]
    text = ours.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    first_system = text.split("<|im_end|>")[0]
    assert first_system.startswith("<|im_start|>system\n" + (system or "You are a helpful AI assistant named SmolLM"))
    assert "<tools>\n" + json.dumps(TOOLS[0], ensure_ascii=False) + "\n</tools>" in first_system
    # the calls come back out with the hermes parser's pattern, arguments as JSON objects
    after_system = text.split("<|im_end|>", 1)[1]
    parsed = [json.loads(m) for m in re.findall(r"<tool_call>(.*?)</tool_call>", after_system, re.S)]
    assert parsed == [{"name": "bash", "arguments": {"cmd": "ls"}}, {"name": "bash", "arguments": {"cmd": "pwd"}}]
    assert "<|im_start|>tool\na.txt<|im_end|>\n<|im_start|>assistant\n" in text


def _tiny_model_dir(path, template: str | None, smollm2_dir):
    """A small transformers directory: a random 2-layer Llama + SmolLM2's tokenizer with `template`."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(path)
    shutil.copy(smollm2_dir / "tokenizer.json", path / "tokenizer.json")
    cfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    if template is not None:
        cfg["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


def test_import_directory_installs_the_tool_template_keeping_the_default_system(tmp_path, smollm2_dir, capsys):
    stock = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
             "{{ '<|im_start|>system\nYou are Tiny, it\\'s small<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
             "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    src = _tiny_model_dir(tmp_path / "src", stock, smollm2_dir)
    home = tmp_path / "home"
    assert main(["model", "import", str(src), "--name", "tiny", "--home", str(home)]) == 0
    out = home / "models" / "tiny"
    assert capsys.readouterr().out.strip() == str(out)
    assert resolve_model_dir("tiny", home) == out.resolve() and resolve_model_dir(out) == out.resolve()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tools=TOOLS, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are Tiny, it's small\n\n# Tools") and "<tools>" in text
    # a second import under the same name is refused; --force replaces it
    assert main(["model", "import", str(src), "--name", "tiny", "--home", str(home)]) == 2
    assert "exists already" in capsys.readouterr().err
    custom = tmp_path / "t.jinja"
    custom.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert main(["model", "import", str(src), "--name", "tiny", "--home", str(home), "--force",
                 "--chat-template", str(custom)]) == 0
    assert (out / CHAT_TEMPLATE).read_text() == custom.read_text()


def test_import_refuses_bad_input_with_a_clear_error(tmp_path, smollm2_dir, capsys):
    home = tmp_path / "home"
    not_chatml = _tiny_model_dir(tmp_path / "llama", "{% for m in messages %}[INST]{{ m['content'] }}{% endfor %}",
                                 smollm2_dir)
    for argv, message in [([str(not_chatml)], "not ChatML"), ([str(tmp_path / "nope.gguf")], "does not exist"),
                          ([str(smollm2_dir / "config.json")], "not a .gguf file"),
                          ([str(tmp_path)], "no config.json"),
                          ([str(smollm2_dir), "--name", "../x"], "--name")]:
        argv = ["model", "import", *argv] + ([] if "--name" in argv else ["--name", "m"]) + ["--home", str(home)]
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    assert not (home / "models" / "m").exists()
    with pytest.raises(ConfigError, match="klong model import"):
        resolve_model_dir("missing", home)
