"""A dataset version laid over one rollout: which steps each window (sub-trajectory) covers, its Q and
advantage, truncated observations, and the steps no window uses with the reason.

    ov = overlay(home, "web-rl@3", rollout_id)
    ov["windows"]   # [{window_idx, first_turn, last_turn, first_step, last_step, n_tokens, q, advantage, steps: [...]}]
    ov["steps"]     # {step_idx: {"windows": [0, 1], "truncated": "kept the last 3,707 of 13,892 tokens"} |
                    #            {"dropped": "turn_too_long: ..."}}

Read from the version's own files (store.datasets layout: `samples.parquet` spans, `tokens.parquet` step
offsets), filtered to the one rollout, so it is what the trainer reads. A step is *used* when a window's
spans (or the prefix) hold it; an unused step after the prefix is explained by the splitting rules
(consumers.split): observations after the last action (`trailing_observations`), an action larger
than the budget with its observations (`turn_too_long`), or observations that did not fit beside their
action (`observation_cut`: the turn was larger than the budget, only its last tokens are kept).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from store.datasets import MANIFEST, SAMPLES, TOKENS, load_manifest, parse_ref, version_dir
from ui.viewer import NotFound

REASONS = {
    "trailing_observations": "observation after the last action: no turn to learn from",
    "turn_too_long": "the action alone is longer than the window budget (max_tokens - prefix): turn dropped",
    "observation_cut": "the turn is longer than the budget: only the last tokens of its observations are kept",
}
WINDOW_COLUMNS = ["window_idx", "first_turn", "last_turn", "n_turns", "first_step", "last_step", "n_tokens",
                  "n_loss_tokens", "obs_truncated", "q", "advantage", "policy_version", "staleness"]


def _read(path: Path, rollout_id: str, columns: list[str]):
    table = pq.read_table(path, columns=["rollout_id", *columns], filters=[("rollout_id", "=", rollout_id)])
    return table.filter(pc.equal(table["rollout_id"], rollout_id))


def overlay(home: Path | str, ref: str, rollout_id: str) -> dict:
    """The version `ref` (NAME@N) over `rollout_id` (see the module docstring); raises NotFound for an unknown
    version. A rollout the version left out gives no windows and the manifest's drops by reason."""
    try:
        name, version = parse_ref(home, ref)
        manifest = load_manifest(home, f"{name}@{version}")
    except Exception as e:  # DatasetError / ConfigError: an unknown name or version
        raise NotFound(str(e)) from e
    vdir = version_dir(home, name, version)
    head = {"ref": f"{name}@{version}", "kind": manifest["kind"], "config": manifest["config"],
            "drops": manifest["drops"], "manifest": str(vdir / MANIFEST)}
    samples = _read(vdir / SAMPLES, rollout_id, [*WINDOW_COLUMNS, "span_step", "span_start", "span_end"])
    tokens = _read(vdir / TOKENS, rollout_id, ["prefix_len", "step_offsets", "step_assistant"])
    if samples.num_rows == 0 or tokens.num_rows == 0:
        return {**head, "included": False, "windows": [], "steps": {}, "prefix_len": None}
    tok = tokens.to_pylist()[0]
    offsets, is_asst, prefix = tok["step_offsets"], tok["step_assistant"], tok["prefix_len"]
    n_steps = len(is_asst)
    windows, steps = [], {}
    for w in sorted(samples.to_pylist(), key=lambda r: r["window_idx"]):
        covered = []
        for s, a, b in zip(w.pop("span_step"), w.pop("span_start"), w.pop("span_end")):
            covered.append(s)
            info = steps.setdefault(s, {"windows": []})
            info["windows"].append(w["window_idx"])
            if a > 0:  # the head of this observation was cut to fit the window
                full = offsets[s + 1] - offsets[s]
                info["truncated"] = f"kept the last {b - a:,} of {full:,} tokens"
        w.pop("rollout_id", None)
        windows.append({**w, "steps": covered})
    last_action = max((i for i in range(n_steps) if is_asst[i]), default=-1)
    for i in range(prefix, n_steps):
        if i in steps:
            continue
        if i > last_action:
            reason = "trailing_observations"
        elif is_asst[i]:
            reason = "turn_too_long"
        else:  # an observation: dropped with its turn's action, or cut to make the turn fit
            nxt = next(j for j in range(i + 1, n_steps) if is_asst[j])
            reason = "observation_cut" if nxt in steps else "turn_too_long"
        steps[i] = {"windows": [], "dropped": reason, "why": REASONS[reason]}
    return {**head, "included": True, "windows": windows, "steps": steps, "prefix_len": prefix}
