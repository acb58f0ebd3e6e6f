"""The chat columns of a verl export: what verl's own dataset classes read, beside the token columns.

    klong dataset export web-sft@3 --format verl -o out/
    # SFT, verl's default MultiTurnSFTDataset:  data.train_files=out/data/*.parquet  (reads `messages`)
    # RL, verl's RLHFDataset:                   data.train_files=... data.prompt_key=prompt
    # token-exact SFT (klong's ids and mask):   data.custom_cls.path=out/klong_verl_dataset.py
    #                                           data.custom_cls.name=KlongTokenDataset

Columns, per sample (window), as verl's data preprocessors write them (`examples/data_preprocess/*.py`):
- `messages`: the window as chat (`trainer.export_messages`): pinned prefix, then the window's steps, tool
  calls structured once. verl's MultiTurnSFTDataset renders it with the model's chat template and puts loss
  on every assistant message after its generation header (`loss` per message says where klong does).
- `prompt`: the messages before the window's first action (for RLHFDataset: verl samples its own actions),
  `data_source` "klong:NAME@N", `ability` "agent", `reward_model` {"style": "model", "ground_truth": task_id}
  (the judge scores against the task's rubric; verl's rule scorers do not apply), `extra_info` {split,
  index, rollout_id, window_idx, task_id, q, advantage}.
The token columns (`input_ids`, `response_mask`, ...) are for `KlongTokenDataset` (`trainer.verl_dataset`),
copied into the export as `klong_verl_dataset.py` so verl loads it by path without klong installed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa

from trainer.export_messages import MESSAGES, prompt_of, window_messages

DATASET_FILE = "klong_verl_dataset.py"
DATASET_CLASS = "KlongTokenDataset"
EXTRA_INFO = pa.struct([("split", pa.string()), ("index", pa.int64()), ("rollout_id", pa.string()),
                        ("window_idx", pa.int32()), ("task_id", pa.string()), ("q", pa.float64()),
                        ("advantage", pa.float64())])
REWARD_MODEL = pa.struct([("style", pa.string()), ("ground_truth", pa.string())])


def verl_columns(settings, version_path: Path, meta: pa.Table, ref: str) -> dict[str, pa.Array]:
    """messages, prompt, ability, reward_model, extra_info for every sample (`meta`: samples in order)."""
    messages, n_prefix = window_messages(settings, version_path)
    rows = meta.num_rows
    task = meta.column("task_id").to_pylist()
    extra = [{"split": "train", "index": j, "rollout_id": r, "window_idx": w, "task_id": t, "q": q, "advantage": a}
             for j, (r, w, t, q, a) in enumerate(zip(meta.column("rollout_id").to_pylist(),
                                                     meta.column("window_idx").to_pylist(), task,
                                                     meta.column("q").to_pylist(),
                                                     meta.column("advantage").to_pylist()))]
    return {"messages": pa.array(messages, MESSAGES),
            "prompt": pa.array([prompt_of(m, p) for m, p in zip(messages, n_prefix)], MESSAGES),
            "ability": pa.array(["agent"] * rows, pa.string()),
            "reward_model": pa.array([{"style": "model", "ground_truth": t} for t in task], REWARD_MODEL),
            "extra_info": pa.array(extra, EXTRA_INFO)}


def write_dataset_class(directory: Path) -> Path:
    """Copies `KlongTokenDataset` (trainer/verl_dataset.py) into the export, where verl's custom_cls loads it."""
    target = Path(directory) / DATASET_FILE
    shutil.copyfile(Path(__file__).with_name("verl_dataset.py"), target)
    return target
