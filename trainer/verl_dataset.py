"""A verl SFT dataset class that reads a klong verl export's token columns as they are (no re-tokenizing).

    # verl's SFT trainer, on `klong dataset export NAME@N --format verl -o out/`:
    data.train_files=out/data/train-00000-of-00001.parquet \\
    data.custom_cls.path=out/klong_verl_dataset.py data.custom_cls.name=KlongTokenDataset

verl builds its SFT dataset as `cls(parquet_files=..., tokenizer=..., config=data_config, processor=...,
max_samples=...)` (`verl.trainer.sft_trainer.create_sft_dataset`); this class takes the same arguments and
gives what verl's own `MultiTurnSFTDataset` gives per sample: `input_ids`, `attention_mask`, `position_ids`,
`loss_mask`, padded right to `data.max_length` (`pad_mode: right`) or unpadded (`pad_mode: no_padding`),
longer samples cut by `data.truncation` (error | left | right). The ids and the loss mask are the export's
`input_ids` and `response_mask`: exactly what `klong train` trains on, chat-template markup included and
the loss only where the dataset puts it. The file imports only torch and pyarrow, so verl loads it by path
(the export writes a copy of it as DIR/klong_verl_dataset.py).
"""

from __future__ import annotations

import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset


class KlongTokenDataset(Dataset):
    """One row of a klong verl export per sample: its input_ids and response_mask, padded or cut as verl's."""

    def __init__(self, parquet_files, tokenizer=None, config=None, processor=None, max_samples: int = -1):
        config = config or {}
        files = [parquet_files] if isinstance(parquet_files, str) else list(parquet_files)
        self.pad_mode = config.get("pad_mode", "right")
        self.truncation = config.get("truncation", "error")
        self.max_length = int(config.get("max_length", 1024))
        if self.pad_mode not in ("right", "no_padding") or self.truncation not in ("error", "left", "right"):
            raise ValueError(f"pad_mode {self.pad_mode!r} / truncation {self.truncation!r}: expected right | "
                             "no_padding and error | left | right")
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = 0 if pad is None else int(pad)
        self.ids, self.mask = [], []
        for f in files:
            table = pq.read_table(f, columns=["input_ids", "response_mask"])
            self.ids += table.column("input_ids").to_pylist()
            self.mask += table.column("response_mask").to_pylist()
        if max_samples is not None and 0 < max_samples < len(self.ids):
            self.ids, self.mask = self.ids[:max_samples], self.mask[:max_samples]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        ids = torch.tensor(self.ids[i], dtype=torch.long)
        mask = torch.tensor(self.mask[i], dtype=torch.long)
        n = len(ids)
        if n > self.max_length:
            if self.truncation == "error":
                raise ValueError(f"sample {i} has {n} tokens, more than data.max_length={self.max_length} "
                                 "(set data.truncation=left|right, or a larger max_length)")
            keep = slice(n - self.max_length, n) if self.truncation == "left" else slice(0, self.max_length)
            ids, mask, n = ids[keep], mask[keep], self.max_length
        positions = torch.arange(n, dtype=torch.long)
        if self.pad_mode == "no_padding":
            return {"input_ids": ids, "position_ids": positions, "loss_mask": mask}
        extra = self.max_length - n
        return {"input_ids": torch.cat([ids, torch.full((extra,), self.pad_id, dtype=torch.long)]),
                "attention_mask": torch.cat([torch.ones(n, dtype=torch.long), torch.zeros(extra, dtype=torch.long)]),
                "position_ids": torch.cat([positions, torch.zeros(extra, dtype=torch.long)]),
                "loss_mask": torch.cat([mask, torch.zeros(extra, dtype=torch.long)])}
