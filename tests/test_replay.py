"""Replay: a dataset version rebuilt from the archive, or from Kafka itself, has the same content hash;
tampering with the stored files is refused by the reader and reported by replay."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from consumers.materialize import build_version
from store.archive import list_flushes
from store.datasets import SAMPLES, DatasetError, open_version, version_dir
from consumers.replay import replay
from tests.helpers import produce, rollout_events
from tests.test_datasets import cli, sink
from tests.test_materialize import task

CFG = {"max_tokens": 1000, "overlap_turns": 1}


def two_flushes(settings):
    """Events archived by two sink runs (so the archive has several flush directories per partition)."""
    first = [task("task-a"), task("paper-eval", "eval")] + rollout_events("r0", 30, seed=0) + \
        rollout_events("e0", 20, seed=1, task_id="paper-eval")
    produce(settings, first)
    sink(settings)
    produce(settings, rollout_events("r1", 30, seed=2) + rollout_events("r2", 24, seed=3, group_id="g1") +
            rollout_events("p0", 12, seed=4, end=None))
    sink(settings)


def test_replay_from_archive_and_from_kafka_gives_the_same_hash(settings, capsys):
    two_flushes(settings)
    out = build_version(settings.home, "ds", "rl", CFG)
    assert out.manifest["counts"]["rollouts"] == 3 and out.manifest["pending"] == ["p0"]
    # events after the build: the archive grows, the version's input set does not
    produce(settings, rollout_events("late", 30, seed=5) + rollout_events("r9", 30, seed=6))
    sink(settings)

    assert cli(settings, "replay", "ds@1") == 0
    assert f"identical: ds@1 rebuilt from the archive has content hash {out.manifest['content_hash']}" in capsys.readouterr().out
    assert cli(settings, "replay", "ds@1", "--from-kafka") == 0
    assert "identical: ds@1 rebuilt from Kafka" in capsys.readouterr().out
    assert not any((settings.home / "_replay").iterdir())  # the scratch archive is gone again
    # a build now sees the late events: a new version, and that one replays from Kafka as well
    new = build_version(settings.home, "ds", "rl", CFG)
    assert new.ref == "ds@2" and new.manifest["counts"]["rollouts"] == 5
    report = replay(settings, "ds@2", from_kafka=True)
    assert report.identical, report.differences
    assert report.rebuilt_hash == new.manifest["content_hash"] != out.manifest["content_hash"]


def test_tampered_dataset_is_refused_and_reported(settings, capsys):
    two_flushes(settings)
    out = build_version(settings.home, "ds", "rl", CFG)
    assert len(list(open_version(settings.home, out.ref))) == out.manifest["counts"]["samples"]
    path = version_dir(settings.home, "ds", 1) / SAMPLES
    table = pq.read_table(path)
    adv = table.column("advantage")
    table = table.set_column(table.schema.get_field_index("advantage"), "advantage",
                             pc.add(adv, pa.scalar(0.25, pa.float64())))
    pq.write_table(table, path)  # a "small fix" by hand: the version must not silently change
    with pytest.raises(DatasetError, match="do not match"):
        open_version(settings.home, "ds@1")
    assert cli(settings, "replay", "ds@1") == 1
    text = capsys.readouterr().out
    assert "DIFFERENT" in text and "samples no longer match the manifest" in text
    assert f"rebuilt:  {out.manifest['content_hash']}" in text  # the events still give the recorded content


def test_replay_reports_what_the_archive_lost(settings, capsys):
    two_flushes(settings)
    build_version(settings.home, "ds", "rl", CFG)
    steps = [f for f in list_flushes(settings.archive_dir) if (f.path / "step.parquet").exists()]
    shutil.rmtree(steps[-1].path)
    assert cli(settings, "replay", "ds@1") == 1
    text = capsys.readouterr().out
    assert "1 recorded flush directories are gone" in text and "counts.steps_read" in text
