"""Exports read by the peers' own code: verl's MultiTurnSFTDataset and RLHFDataset read `--format verl` as
written, and verl's `data.custom_cls` loader takes the export's KlongTokenDataset (klong's exact ids and mask).

The data is real: PaperBench-shaped teacher trajectories with tool calls (several calls in one message too,
the reference agent's tool schemas on two of them) imported with the real SmolLM2 chat template
(`--tokenizer`), archived by the sink, built into a dataset whose windows start at tool results, exported
by the CLI. verl 0.9.1 is installed with `pip install --no-deps`
(Makefile); where it does not import, these tests skip saying why.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import numpy as np
import pytest

from consumers.materialize import build_version
from services.broker import ensure_topics
from core.settings import Settings, Topics
from producers.agent_tools import TOOLS
from tests.test_import import call, cli, paperbench_row, sink, task_event
from tests.helpers import produce
from trainer.data import DatasetReader


def _verl():
    try:
        from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset
        from verl.utils.dataset.rl_dataset import RLHFDataset, get_dataset_class
        from verl.utils.import_utils import load_extern_object
    except Exception as e:  # noqa: BLE001 (any import failure means: no verl here)
        pytest.skip(f"verl does not import here ({type(e).__name__}: {e}); `make test` installs verl==0.9.1 --no-deps")
    return MultiTurnSFTDataset, RLHFDataset, get_dataset_class, load_extern_object


def _rows() -> list[dict]:
    rows = []
    for k in range(3):
        row = paperbench_row(task_id="fre", chunks=2, work=14, id=f"teacher-{k}", score=0.2 + 0.3 * k)
        # one message with two tool calls (rendered once each, not again from the content)
        row["messages"][-1:-1] = [{"role": "assistant", "content": "Two checks at once.", "tool_calls": [
            call(f"x{k}", "bash", cmd="ls"), call(f"y{k}", "bash", cmd="pwd")]},
            {"role": "tool", "tool_call_id": f"x{k}", "content": "f0.py"},
            {"role": "tool", "tool_call_id": f"y{k}", "content": "/home/submission"}]
        if k < 2:  # the reference agent's tools, rendered into the system message's ids at import
            row["tools"] = TOOLS
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def verl_export(broker, smollm2_dir, tmp_path_factory):
    """sft@1 of three imported trajectories, windows of <= 1300 tokens (the tools block alone is ~730),
    exported with --format verl. Built with prefix_loss=always (every assistant message carries loss in every window, as verl's MultiTurnSFTDataset
    trains them). Built once for the module (an import, a build and a CLI export: its tests only read it; the
    RL test builds rl@1 beside it and exports that to its own directory)."""
    tmp_path = tmp_path_factory.mktemp("verl-export")
    settings = Settings(home=tmp_path / "home", bootstrap_servers=broker.bootstrap,
                        topics=Topics(f"t{uuid.uuid4().hex[:10]}"), partitions=4)
    settings.home.mkdir(parents=True)
    ensure_topics(settings)
    produce(settings, [task_event("fre")])
    path = tmp_path / "teacher.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    assert cli(settings, "import", "trajectories", str(path), "--tokenizer", str(smollm2_dir)) == 0
    sink(settings)
    # prefix_loss=always: every assistant message carries loss in every window, as verl's MultiTurnSFTDataset has it
    build_version(settings.home, "sft", "sft", {"max_tokens": 1300, "overlap_turns": 1, "prefix_loss": "always",
                                                "tokenizer": str(smollm2_dir)})
    out = tmp_path / "verl"
    run = subprocess.run([sys.executable, "-m", "klong.cli", "dataset", "export", "sft@1", "--format", "verl", "-o",
                          str(out), "-q", "--home", str(settings.home), "--bootstrap-servers", settings.bootstrap_servers,
                          "--topic-prefix", settings.topics.prefix], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "data.custom_cls.path=" in run.stdout
    return settings, out


def _files(out):
    return sorted(str(p) for p in (out / "data").glob("*.parquet"))


def test_verl_multiturn_sft_dataset_reads_the_export(verl_export, smollm2_dir):
    """verl's default SFT dataset renders each window's messages to exactly the export's ids (tool calls once,
    windows that start with a tool result included), and trains where the export does, except on template
    markup (the generation header, the closing `<|im_end|>\n`), which verl masks its own way."""
    MultiTurnSFTDataset, *_ = _verl()
    from transformers import AutoTokenizer

    settings, out = verl_export
    tok = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    data = MultiTurnSFTDataset(_files(out), tok, {"max_length": 4096, "pad_mode": "no_padding", "truncation": "error"})
    import pyarrow.parquet as pq

    table = pq.read_table(_files(out))
    reader = DatasetReader(settings.home, "sft@1")
    assert len(data) == table.num_rows == len(reader) > 6
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    closing = set(tok("<|im_end|>\n", add_special_tokens=False)["input_ids"])
    starts_with_tool = two_calls = with_tools = 0
    for j in range(len(data)):
        item = data[j]
        row = table.slice(j, 1).to_pylist()[0]
        msgs = row["messages"]
        assert msgs is not None
        body = [m for m in msgs if m["step_idx"] >= row["first_step"]]
        starts_with_tool += body[0]["role"] == "tool"
        two_calls += any(len(m["tool_calls"] or []) == 2 for m in msgs)
        with_tools += "<tools>" in msgs[0]["content"]  # what the template rendered into the system ids
        assert all("<tool_call>" not in (m["content"] or "") for m in msgs if m["role"] == "assistant")
        assert item["input_ids"].tolist() == row["input_ids"]  # same ids: nothing rendered twice
        ours, theirs = np.array(row["response_mask"]), item["loss_mask"].numpy()
        ids = np.array(row["input_ids"])
        # Where the masks differ, the token is generation-header or closing markup, never the text.
        diff = np.flatnonzero(ours != theirs)
        assert all(int(ids[d]) in closing or int(ids[d]) in header for d in diff), [tok.decode(ids[d:d + 3]) for d in diff]
    assert starts_with_tool > 0 and two_calls > 0 and 0 < with_tools < len(data)


@pytest.mark.parametrize("kind", ["sft", "rl"])
def test_verl_rlhf_dataset_reads_the_export(verl_export, smollm2_dir, tmp_path, kind):
    """verl's RLHFDataset (prompt filtering by length with the real template, then __getitem__) reads every
    row of an SFT and an RL version: the prompt is the window's context before its first action,
    data_source / reward_model / extra_info as verl's preprocessors write them."""
    _, RLHFDataset, get_dataset_class, _ = _verl()
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from trainer.export import export_dataset

    settings, out = verl_export
    if kind == "rl":  # the scored teacher rows: Q from their judge results, group-relative advantages
        build_version(settings.home, "rl", "rl", {"max_tokens": 1300, "overlap_turns": 1, "tokenizer": str(smollm2_dir)})
        out = tmp_path / "verl-rl"
        export_dataset(settings.home, "rl@1", "verl", out, settings=settings)
    tok = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    config = OmegaConf.create({"prompt_key": "prompt", "max_prompt_length": 4096, "filter_overlong_prompts": True,
                               "filter_overlong_prompts_workers": 1, "cache_dir": str(tmp_path / "verl-cache")})
    assert get_dataset_class(config) is RLHFDataset
    data = RLHFDataset(_files(out), tok, config)
    assert len(data) > 6
    for j in range(len(data)):
        item = data[j]
        prompt = item["raw_prompt"]
        assert prompt and prompt[-1]["role"] != "assistant" and prompt[0]["role"] == "system"
        assert item["data_source"] == f"klong:{kind}@1" and item["reward_model"]["ground_truth"] == "fre"
        assert item["extra_info"]["index"] == item["index"] == j and item["extra_info"]["rollout_id"].startswith("imp-")
        if kind == "rl":
            assert item["extra_info"]["q"] in (0.2, 0.5, 0.8) and item["extra_info"]["advantage"] == item["advantage"]
        ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        assert len(ids) <= 4096


def test_verl_custom_cls_loads_klong_token_dataset(verl_export):
    """verl's own custom_cls loader (as create_sft_dataset / get_dataset_class call it) loads the class the
    export wrote; its samples are the export's ids and loss mask exactly, padded and cut as verl's."""
    *_, get_dataset_class, load_extern_object = _verl()
    from omegaconf import OmegaConf

    settings, out = verl_export
    manifest = json.loads((out / "klong_export.json").read_text())
    spec = manifest["verl_custom_cls"]
    config = OmegaConf.create({"custom_cls": {"path": str(out / spec["path"]), "name": spec["name"]},
                               "max_length": 1400, "truncation": "error", "pad_mode": "right"})
    cls = get_dataset_class(config)  # verl's RL path; its SFT path (create_sft_dataset) calls load_extern_object
    assert cls.__name__ == load_extern_object(config.custom_cls.path, config.custom_cls.name).__name__ == spec["name"]
    data = cls(parquet_files=_files(out), tokenizer=None, config=config, processor=None, max_samples=-1)
    reader = DatasetReader(settings.home, "sft@1")
    assert len(data) == len(reader)
    for j in range(len(reader)):
        mb = reader.batch(np.array([j]))
        n = int(mb.lengths[0])
        item = data[j]
        assert item["input_ids"].shape == (1400,) and int(item["attention_mask"].sum()) == n
        assert item["input_ids"][:n].tolist() == mb.input_ids[0, :n].tolist()
        assert item["loss_mask"][:n].tolist() == mb.loss_mask[0, :n].tolist() and not item["loss_mask"][n:].any()
    short = cls(_files(out), None, OmegaConf.create({"max_length": 8, "truncation": "error"}))
    with pytest.raises(ValueError, match="more than data.max_length=8"):
        short[0]
