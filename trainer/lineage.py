"""Lineage: a training run's `training_run` events, and the way back from a checkpoint to the exact events.

    with RunEvents(settings, run_dir, run_id) as ev:           # rank 0 only; durable outbox in RUN_DIR/outbox
        ev.started(dataset="web-rl@3", dataset_hash=..., mode="rl", policy_version_in=4, config={...})
        ev.metrics(step, {"loss": 1.2, ...}); ev.checkpoint(step, policy_version=5, path=...); ev.ended(...)
    trace(settings, "HOME/runs/<run>/checkpoints/step-30")    # -> checkpoint -> run -> dataset -> events

Events go through the same path as every other producer (`producers.recorder.publish` -> durable
`producers.outbox.Outbox` -> Kafka topic `<prefix>.training` -> sink -> archive), keyed by run_id so a
run's events stay in order. The outbox lives in the run directory: training never waits for Kafka
(events are on local disk before `put` returns), and what Kafka has not acknowledged when the run ends
stays there and is sent when the run is resumed. SQL: `training_runs`, `training_metrics`,
`training_checkpoints` (store/training.py).

From a checkpoint back to the events: its `klong_state.json` names run_id, dataset NAME@N and the
content hash; the dataset's manifest names its input (archive flush directories and the Kafka offset
watermark per topic-partition); `trace` checks the hash still matches and returns a SQL predicate over
(kafka_topic, kafka_partition, kafka_offset) that selects exactly those events in any `*_events` view.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from core.settings import Settings
from producers.outbox import Outbox
from producers.recorder import publish
from schemas.errors import ConfigError, KlongError
from schemas.events import TrainingRun, TrainingRunPayload, new_event
from store import datasets as ds
from trainer.model import read_state

log = logging.getLogger("klong.trainer")


class RunEvents:
    def __init__(self, settings: Settings, run_dir: Path, run_id: str, flush_timeout_s: float = 30.0):
        settings.bootstrap()  # ConfigError now (before training) if there is no Kafka to talk to
        self.run_id, self.flush_timeout_s = run_id, flush_timeout_s
        self.outbox = Outbox(settings, run_dir / "outbox", fsync="batch", retain="archived")

    def _emit(self, phase: str, **fields: Any) -> None:
        payload = TrainingRunPayload(run_id=self.run_id, phase=phase, **fields)
        publish(self.outbox, new_event(TrainingRun, payload=payload))

    def started(self, *, dataset: str, dataset_hash: str, mode: str, policy_version_in: int, config: dict,
                step: int = 0) -> None:
        self._emit("started", dataset=dataset, dataset_hash=dataset_hash, mode=mode,
                   policy_version_in=policy_version_in, step=step, config=config)

    def metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._emit("metrics", step=step, metrics={k: float(v) for k, v in metrics.items()})

    def checkpoint(self, step: int, *, policy_version: int, path: Path, dataset: str, dataset_hash: str) -> None:
        self._emit("checkpoint", step=step, policy_version_out=policy_version, checkpoint=str(path),
                   dataset=dataset, dataset_hash=dataset_hash)

    def ended(self, step: int, *, status: str, policy_version_out: Optional[int], metrics: dict[str, float]) -> None:
        self._emit("ended", step=step, policy_version_out=policy_version_out,
                   metrics={k: float(v) for k, v in metrics.items()}, config={"status": status})

    def close(self) -> None:
        try:
            self.outbox.flush(timeout=self.flush_timeout_s, until="acked")
        except KlongError as e:
            log.warning("lineage events not yet acknowledged by Kafka (%s); they stay in %s and are sent "
                        "when this run is resumed", e, self.outbox.directory)
        self.outbox.close(timeout=1.0)

    def __enter__(self) -> "RunEvents":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _watermark_predicate(watermark: dict[str, list[list[int]]]) -> str:
    """{"topic/topic_id/partition": [[first, last], ...]} (the manifest's watermark) -> SQL over the Kafka
    coordinates every archived event carries. (The topic incarnation, topic_id, is in the flush directory
    names the manifest also lists; offsets only repeat if a topic is deleted and recreated.)"""
    terms = []
    for key, ranges in sorted(watermark.items()):
        topic, _topic_id, part = key.rsplit("/", 2)
        spans = " OR ".join(f"kafka_offset BETWEEN {int(lo)} AND {int(hi)}" for lo, hi in ranges)
        terms.append(f"(kafka_topic = '{topic}' AND kafka_partition = {int(part)} AND ({spans}))")
    return " OR ".join(terms) or "false"


def trace(home: Path | str, checkpoint: Path | str, archive=None) -> dict:
    """checkpoint directory -> {run_id, step, policy_version, dataset, dataset_hash, hash_ok, manifest input,
    events_where}: `events_where` selects the dataset's exact input events in any `*_events` view. With
    `archive` in a bucket, a version published only there is fetched (store.datasets_s3)."""
    state = read_state(checkpoint)
    if state is None:
        raise ConfigError(f"{checkpoint} is not a klong checkpoint (no klong_state.json)")
    manifest = ds.load_manifest(home, state["dataset"], archive=archive)
    return {
        "run_id": state["run_id"], "step": state["step"], "policy_version": state["policy_version"],
        "dataset": state["dataset"], "dataset_hash": state["dataset_hash"],
        "hash_ok": manifest["content_hash"] == state["dataset_hash"],
        "flushes": manifest["input"]["flushes"], "watermark": manifest["input"]["watermark"],
        "events_where": _watermark_predicate(manifest["input"]["watermark"]),
    }
