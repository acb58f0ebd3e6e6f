"""Lost archive data never goes unseen: a deleted file, a deleted first/middle/last flush and stray entries
(a README, symlinks to /etc, a junk Parquet file) are found by `klong archive verify`, ignored by every reader,
and `klong archive repair` re-fetches what is lost from the real broker until the views count what they
counted before the damage."""

from __future__ import annotations

import os
import shutil

import pytest

from consumers.sink import Sink
from klong.cli import main
from store.archive import MANIFEST, list_flushes
from store.catalog import Catalog
from store.integrity import quarantined, verify
from store.status import status
from tests.helpers import produce, rollout_events
from tests.test_cli import klong

COUNTS = """SELECT (SELECT count(*) FROM steps) AS steps, (SELECT count(*) FROM rollouts) AS rollouts,
                   (SELECT count(*) FROM judge_results) AS judged, (SELECT sum(n_tokens) FROM steps) AS tokens"""


def counts(settings) -> dict:
    return Catalog(settings).arrow(COUNTS).to_pylist()[0]


@pytest.fixture
def three_flushes(make_settings):
    """One partition, three sink runs: the rollouts topic gets a first, a middle and a last flush."""
    settings = make_settings(partitions=1)
    for r in range(3):
        produce(settings, rollout_events(f"r{r}", 8 + r, seed=r))
        Sink(settings).run(until_idle=True)
    flushes = sorted((d for d in list_flushes(settings.archive_dir) if d.topic == settings.topics.rollouts),
                     key=lambda d: d.start)
    assert len(flushes) == 3 and all((d.path / MANIFEST).is_file() for d in flushes)
    return settings, flushes


def test_verify_finds_each_loss_and_repair_restores_the_views(three_flushes, capsys):
    settings, (first, middle, last) = three_flushes
    before = counts(settings)
    assert main(klong(settings, "archive", "verify")) == 0
    (first.path / "step.parquet").unlink()  # one file of a flush
    shutil.rmtree(middle.path)  # a whole flush in the middle of the partition
    topic_dir = settings.archive_dir / settings.topics.rollouts
    (topic_dir / "README.txt").write_text("notes\n")  # stray files and symlinks at topic level and above
    os.symlink("/etc", topic_dir / "etc")
    os.symlink("/etc", settings.archive_dir / "evil.topic")
    os.symlink("/etc/passwd", last.path / "junk.parquet")

    # Readers skip the strays (never follow them) instead of failing.
    assert counts(settings)["steps"] < before["steps"]
    assert status(settings)["archive"]["stray entries ignored"] == 4
    capsys.readouterr()
    assert main(klong(settings, "archive", "verify")) == 1
    out = capsys.readouterr().out
    assert f"BAD {first.path.relative_to(settings.archive_dir)}: step.parquet: missing" in out
    assert f"MISSING {settings.topics.rollouts}/{middle.topic_id}: {settings.topics.rollouts}+0 offsets " \
           f"{middle.start}..{middle.end} are in no flush" in out
    for stray in ("README.txt", "/etc:", "evil.topic", "junk.parquet"):
        assert any(line.startswith("warning: stray") and stray in line for line in out.splitlines()), stray
    assert "1 bad, 1 ranges missing, 4 stray entries ignored" in out

    assert main(klong(settings, "archive", "repair")) == 0
    out = capsys.readouterr().out
    assert out.count("re-fetched from Kafka") == 2 and "quarantined" in out and "NOT re-fetched" not in out
    assert counts(settings) == before
    assert [p.kind for p in verify(settings.archive_dir)] == ["stray"] * 4  # left in place, reported
    assert main(klong(settings, "archive", "verify")) == 0
    assert len(quarantined(settings.archive_dir)) == 1  # only the damaged flush; nothing deleted


def test_a_lost_first_flush_is_found_from_the_chain(three_flushes, capsys):
    settings, (first, _, _) = three_flushes
    before = counts(settings)
    shutil.rmtree(first.path)
    problems = verify(settings.archive_dir)
    assert [(p.kind, p.gap.after, p.gap.through) for p in problems] == [("missing", None, first.end)]
    assert main(klong(settings, "archive", "repair")) == 0
    assert counts(settings) == before and verify(settings.archive_dir) == []


def test_a_lost_last_flush_is_found_from_the_committed_offset(three_flushes, capsys):
    settings, (_, middle, last) = three_flushes
    before = counts(settings)
    shutil.rmtree(last.path)
    assert verify(settings.archive_dir) == []  # the archive alone cannot tell...
    assert main(klong(settings, "archive", "verify")) == 1  # ...the sink's committed offset can
    assert f"offsets {middle.end + 1}..{last.end} are in no flush" in capsys.readouterr().out
    assert main(klong(settings, "archive", "repair")) == 0
    assert counts(settings) == before


def test_a_damaged_last_flush_is_refetched_from_the_embedded_broker(three_flushes, capsys):
    """Tansu reports a partition's end offset as its last batch's base offset + 1, below the last offset it
    serves; repair must not take that for "Kafka no longer has it"."""
    settings, (_, _, last) = three_flushes
    before = counts(settings)
    f = last.path / "step.parquet"
    f.write_bytes(f.read_bytes()[:100])
    assert main(klong(settings, "archive", "repair")) == 0
    out = capsys.readouterr().out
    assert f"re-fetched from Kafka: {last.path.relative_to(settings.archive_dir)}" in out
    assert counts(settings) == before and verify(settings.archive_dir) == []


@pytest.mark.parametrize("legacy", [False, True], ids=["manifest", "no-manifest"])
def test_a_junk_parquet_file_does_not_hide_good_rows(three_flushes, legacy, capsys):
    settings, (first, middle, _) = three_flushes
    before = counts(settings)
    if legacy:  # a flush written before manifests existed
        (middle.path / MANIFEST).unlink()
    shutil.copy(first.path / "step.parquet", middle.path / "junk.parquet")  # valid Parquet, other rows
    shutil.copy(first.path / "step.parquet", middle.path / "step.copy.parquet")
    assert counts(settings) == before
    assert {p.kind for p in verify(settings.archive_dir)} == {"stray"}
    assert main(klong(settings, "archive", "repair")) == 0
    assert "quarantined" not in capsys.readouterr().out and quarantined(settings.archive_dir) == []
    assert counts(settings) == before


def test_a_tampered_file_is_found_by_its_checksum(three_flushes, capsys):
    settings, (first, _, _) = three_flushes
    before = counts(settings)
    manifest = (first.path / MANIFEST).read_text()
    other = first.path / "rollout_started.parquet"  # same size, other bytes: a valid file that is not the one written
    data = bytearray((first.path / "rollout_started.parquet").read_bytes())
    data[len(data) // 2] ^= 0xFF
    other.write_bytes(bytes(data))
    assert (first.path / MANIFEST).read_text() == manifest
    problems = verify(settings.archive_dir)
    assert [p.kind for p in problems] == ["damaged"] and "CRC-32" in problems[0].what
    assert main(klong(settings, "archive", "repair")) == 0
    assert counts(settings) == before and verify(settings.archive_dir) == []


def test_a_conflicting_duplicate_gives_one_answer_and_is_counted(make_settings, capsys):
    """A step re-sent with an existing event_id and other content: every query answers with the copy archived
    first, 20 times out of 20, and `klong status` counts the conflict."""
    import msgspec

    settings = make_settings(partitions=1)
    events = rollout_events("dup", 10)
    original = events[4]
    produce(settings, events)
    Sink(settings).run(until_idle=True)
    for k in range(4):  # several tampered copies in later flushes, and a plain resend of the original
        tampered = msgspec.structs.replace(original, payload=msgspec.structs.replace(
            original.payload, content=f"tampered {k}"))
        produce(settings, [tampered, original] + rollout_events(f"other{k}", 4, seed=k))
        Sink(settings).run(until_idle=True)
    query = f"SELECT content FROM steps WHERE rollout_id = 'dup' AND step_idx = {original.payload.step_idx}"
    answers = [Catalog(settings).sql(query)["content"].to_list() for _ in range(20)]
    assert answers == [[original.payload.content]] * 20
    assert Catalog(settings).scalar("SELECT count(*) FROM steps WHERE rollout_id = 'dup'") == 10
    dup = Catalog(settings).sql("SELECT * FROM conflicting_duplicates").to_dicts()
    assert [(d["event_type"], d["event_id"], d["n_versions"]) for d in dup] == [("step", original.event_id, 5)]
    assert status(settings)["archive"]["conflicting duplicates"] == 1
    assert main(klong(settings, "status")) == 0 and "conflicting duplicates 1" in capsys.readouterr().out


@pytest.mark.parametrize("text", ['{"files": {"../../etc/passwd": {}}, "after": "x"}', "{not json", "[]"])
def test_a_bad_manifest_makes_its_flush_damaged_not_a_crash(three_flushes, text, capsys):
    settings, (_, middle, _) = three_flushes
    before = counts(settings)
    (middle.path / MANIFEST).write_text(text)
    assert counts(settings) == before  # read like a flush without a manifest meanwhile
    problems = verify(settings.archive_dir)
    assert [(p.kind, p.path) for p in problems] == [("damaged", middle.path)] and MANIFEST in problems[0].what
    assert main(klong(settings, "archive", "repair")) == 0
    assert counts(settings) == before and verify(settings.archive_dir) == []
