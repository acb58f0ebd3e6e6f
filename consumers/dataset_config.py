"""Dataset build config: `DatasetConfig`, the `key=value` settings of `klong dataset build`, checked at once.

    >>> DatasetConfig.from_mapping({"max_tokens": 32768, "reward_mode": "final"})

A frozen dataclass whose `__post_init__` checks every field (bad values raise a one-line `ConfigError`
naming the key) and normalizes the filters (stage, iteration, tasks, statuses) to sorted tuples, so two
configs that mean the same compare (and hash into the manifest) the same. `split_config()` hands the
window settings to `consumers.split`; `to_dict()` is what the manifest stores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional, get_args

from consumers.rewards import RewardMode
from consumers.split import PrefixLoss, SplitConfig, WindowMode
from schemas.errors import ConfigError
from schemas.events import RolloutStatus


def _ints(key: str, v: Any, lo: int) -> Optional[tuple[int, ...]]:
    if v is None:
        return None
    vals = v if isinstance(v, (list, tuple)) else [v]
    if not vals or not all(isinstance(x, int) and not isinstance(x, bool) and x >= lo for x in vals):
        raise ConfigError(f"{key} must be an integer >= {lo} or a list of them, got {v!r}")
    return tuple(sorted(set(vals)))


@dataclass(frozen=True)
class DatasetConfig:
    max_tokens: int = 32768  # L_max: prefix + window tokens
    overlap_turns: int = 2  # O: turns shared by consecutive windows
    loss_on_overlap: bool = True
    prefix_loss: PrefixLoss = "first"
    windows: WindowMode = "fit"  # fit: eq. 4-6 windows; context: one window per recorded generation context
    reward_mode: RewardMode = "final"
    std_normalize: bool = False
    drop_constant_groups: bool = False
    max_staleness: Optional[int] = None  # policy versions; None: keep every window
    trainer_policy_version: Optional[int] = None  # staleness is measured from it (None: newest in the dataset)
    tokenizer: str = "bytes"  # for text-only steps: "bytes", a tokenizer.json, a model directory or NAME (HOME/models)
    stage: Optional[tuple[int, ...]] = None  # only rollouts of these stages (None: all)
    iteration: Optional[tuple[int, ...]] = None
    tasks: Optional[tuple[str, ...]] = None  # only these (train) tasks
    statuses: tuple[str, ...] = ("finished", "timeout")

    def __post_init__(self) -> None:
        self.split_config()  # validates max_tokens, overlap_turns, loss_on_overlap, prefix_loss, windows
        if self.reward_mode not in get_args(RewardMode):
            raise ConfigError(f"reward_mode must be one of {get_args(RewardMode)}, got {self.reward_mode!r}")
        for key in ("std_normalize", "drop_constant_groups"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if self.max_staleness is not None and (not isinstance(self.max_staleness, int) or isinstance(
                self.max_staleness, bool) or self.max_staleness < 0):
            raise ConfigError(f"max_staleness must be an integer >= 0 (or null), got {self.max_staleness!r}")
        tpv = self.trainer_policy_version
        if tpv is not None and (not isinstance(tpv, int) or isinstance(tpv, bool) or tpv < 0):
            raise ConfigError(f"trainer_policy_version must be an integer >= 0 (or null), got {tpv!r}")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise ConfigError("tokenizer must be 'bytes', a tokenizer.json, a model directory or a NAME under "
                              f"HOME/models, got {self.tokenizer!r}")
        object.__setattr__(self, "stage", _ints("stage", self.stage, 1))
        object.__setattr__(self, "iteration", _ints("iteration", self.iteration, 0))
        tasks = self.tasks
        if tasks is not None:
            tasks = [tasks] if isinstance(tasks, str) else tasks
            if not tasks or not all(isinstance(t, str) and t for t in tasks):
                raise ConfigError(f"tasks must be a task_id or a list of them, got {self.tasks!r}")
            object.__setattr__(self, "tasks", tuple(sorted(set(tasks))))
        statuses = [self.statuses] if isinstance(self.statuses, str) else self.statuses
        bad = [s for s in statuses or [None] if s not in get_args(RolloutStatus)]
        if bad:
            raise ConfigError(f"statuses must be a non-empty list from {get_args(RolloutStatus)}, got {self.statuses!r}")
        object.__setattr__(self, "statuses", tuple(sorted(set(statuses))))

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> "DatasetConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ConfigError(f"unknown dataset config key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        return cls(**config)

    def split_config(self) -> SplitConfig:
        return SplitConfig(self.max_tokens, self.overlap_turns, self.loss_on_overlap, self.prefix_loss, self.windows)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

