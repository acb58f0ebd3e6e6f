"""The archive in a bucket: a real S3 API (SeaweedFS on 127.0.0.1, the `s3_server` fixture) against local disk.

The same events archived to a local directory and to `s3://bucket/prefix` give the same SQL answers; a
flush is committed by its manifest object (one without it is invisible and dropped on resume); the sink
archives exactly once through kill -9s; verify finds a deleted object and repair re-fetches it; SQL reads
nothing else (no local file, no other bucket).
"""

from __future__ import annotations

import dataclasses
import os
import random
import subprocess
import sys
import threading
import time

import pyarrow.dataset as ds
import pytest

from consumers.sink import Sink
from schemas.events import event_type
from store.archive import MANIFEST, archived_files, list_flushes, recover_positions
from store.catalog import Catalog, QueryError
from store.integrity import repair, verify
from core.objstore import location
from tests.helpers import kill_sinks_repeatedly, produce, rollout_events

pytestmark = pytest.mark.timeout(900)


def on_s3(settings, url):
    return dataclasses.replace(settings, archive_url=url)


def raw_counts(settings, table="step"):
    """(rows, distinct event_ids) over the committed flushes' files, no dedup: proves nothing was written twice."""
    files = [str(f) for f in archived_files(settings.archive).get(table, [])]
    t = ds.dataset(files, format="parquet", filesystem=settings.archive.fs).to_table(columns=["event_id"])
    return t.num_rows, len(set(t.column("event_id").to_pylist()))


QUERIES = [
    "SELECT rollout_id, task_id, status, n_steps, n_turns, n_tokens, final_score FROM rollouts ORDER BY rollout_id",
    "SELECT rollout_id, step_idx, role, content, n_tokens, pinned FROM steps ORDER BY rollout_id, step_idx",
    "SELECT rollout_id, step_idx, token_ids, logprobs FROM step_tokens ORDER BY rollout_id, step_idx",
    "SELECT error_kind, raw, \"offset\" FROM dead_letters ORDER BY partition, \"offset\"",
    "SELECT count(*), count(DISTINCT event_id) FROM step_events",
]


def test_sql_on_s3_answers_as_on_local_disk(settings, s3_url):
    events = [e for r in range(6) for e in rollout_events(f"r{r}", 25, seed=r, group_id=f"g{r % 2}")]
    produce(settings, events + events[5:9], raw=[(settings.topics.rollouts, b"r0", b"not json")])  # a resend, a bad one
    s3 = on_s3(settings, s3_url())
    assert Sink(settings).run(until_idle=True).events == len(events) + 4
    assert Sink(s3).run(until_idle=True).events == len(events) + 4
    assert not (settings.home / "archive" / s3.topics.rollouts).exists() or list_flushes(s3.archive)
    local, remote = Catalog(settings), Catalog(s3)
    for q in QUERIES:
        assert local.arrow(q).equals(remote.arrow(q)), q
    assert remote.scalar("SELECT count(*) FROM rollouts") == 6
    assert remote.scalar("SELECT count(*) FROM dead_letters") == 1
    # a second sink finds everything archived: positions come from the bucket's manifests
    assert Sink(s3).run(until_idle=True).events == 0
    assert verify(s3.archive) == []


def test_a_missing_bucket_or_wrong_key_is_one_clear_error(settings, s3_url, monkeypatch):
    from schemas.errors import ConfigError

    with pytest.raises(ConfigError, match="no bucket 'klong-nosuchbucket'"):
        Sink(on_s3(settings, "s3://klong-nosuchbucket/archive"))
    with pytest.raises(ConfigError, match="no bucket 'klong-nosuchbucket'"):
        Catalog(on_s3(settings, "s3://klong-nosuchbucket/archive")).arrow("SELECT count(*) FROM steps")
    url = s3_url()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-key")
    with pytest.raises(ConfigError) as e:
        Sink(on_s3(settings, url))
    assert "wrong-secret-key" not in str(e.value)


def test_flush_without_manifest_is_not_archived_and_is_dropped_on_resume(settings, s3_url):
    s3 = on_s3(settings, s3_url())
    produce(settings, rollout_events("a", 10))
    Sink(s3).run(until_idle=True)
    loc = s3.archive
    (done,) = [d for d in list_flushes(loc) if "step" in d.files]
    # what a sink killed between its Parquet PUTs and its manifest PUT leaves: objects, no manifest
    name = done.path.name.replace("+00000000000000000000+", "+00000000000000000100+", 1)
    name = name[:name.rindex("+") + 1] + f"{200:020d}"
    unfinished = f"{done.path.parent}/{name}"
    loc.write_bytes(f"{unfinished}/step.parquet", loc.read_bytes(str(done.files["step"])))
    assert recover_positions(loc, done.topic, done.topic_id)[done.partition] == done.end + 1
    assert Catalog(s3).scalar("SELECT count(*) FROM step_events") == 10  # the unfinished objects are not read
    (stray,) = [p for p in verify(loc) if p.kind == "stray"]
    assert "no manifest" in stray.what
    Sink(s3).run(until_idle=True)  # resuming the partition deletes the unfinished flush's objects
    assert not loc.list(unfinished) and verify(loc) == []


def test_verify_finds_a_deleted_object_and_repair_refetches_it(make_settings, s3_url, monkeypatch):
    settings = make_settings(partitions=1)
    s3 = on_s3(settings, s3_url())
    for r in range(3):  # three flushes of the one partition at least: a deleted earlier one breaks the chain
        produce(settings, rollout_events(f"v{r}", 12, seed=r))
        Sink(s3, flush_interval_s=0.05).run(until_idle=True)
    loc = s3.archive
    want = Catalog(s3).arrow(QUERIES[1])
    flushes = list_flushes(loc)
    # a whole lost flush that has a later one in its partition (the chain shows the break) ...
    lost = next(d for d in flushes if any((f.topic, f.partition) == (d.topic, d.partition) and f.start > d.end
                                          for f in flushes))
    for i in [o.path for o in loc.list(str(lost.path))]:
        loc.delete(i)
    # ... and a lost object of another flush
    loc.delete(str(next(d for d in flushes if d != lost and "step" in d.files).files["step"]))
    problems = verify(loc)
    assert {p.kind for p in problems} == {"damaged", "missing"}, problems
    assert any("step.parquet: missing" in p.what for p in problems if p.kind == "damaged")
    from klong.cli import main

    monkeypatch.setenv("KLONG_ARCHIVE_URL", s3.archive_url)  # the CLI finds the bucket as a user's shell would
    args = ["--home", str(s3.home), "--bootstrap-servers", s3.bootstrap_servers, "--topic-prefix", s3.topics.prefix]
    assert main(["archive", "verify", *args]) == 1
    report = repair(s3)
    assert len(report.quarantined) == 1 and len(report.refetched) == 2 and not report.lost
    assert verify(loc) == []
    assert Catalog(s3).arrow(QUERIES[1]).equals(want)
    assert main(["archive", "verify", *args]) == 0


def test_sql_reads_nothing_but_the_archive_prefix(settings, s3_url, monkeypatch, capsys):
    s3 = on_s3(settings, s3_url())
    other = location(s3_url("secret"))
    other.write_bytes(other.join("x.parquet"), b"PAR1 not really")
    produce(settings, rollout_events("l", 5))
    Sink(s3).run(until_idle=True)
    cat = Catalog(s3)
    assert cat.scalar("SELECT count(*) FROM steps") == 5
    refused = ["SELECT * FROM read_text('/etc/passwd')", "SELECT * FROM read_csv('/etc/passwd')",
               f"SELECT * FROM read_parquet('{other.url_of(other.join('x.parquet'))}')",
               f"SELECT * FROM read_parquet('{s3.archive.url}/**/*.parquet')",
               "SELECT * FROM glob('/*')", f"SELECT * FROM read_text('{settings.home}/*')",
               "SELECT * FROM read_text('/proc/self/environ')"]
    for q in refused:
        with pytest.raises(QueryError):
            cat.arrow(q)
    from klong.cli import main

    monkeypatch.setenv("KLONG_ARCHIVE_URL", s3.archive_url)  # `klong sql` as a user runs it
    args = ["--home", str(s3.home), "--bootstrap-servers", s3.bootstrap_servers, "--topic-prefix", s3.topics.prefix]
    capsys.readouterr()
    assert main(["sql", "SELECT count(*) AS n FROM steps", "--format", "csv", *args]) == 0
    assert capsys.readouterr().out.split() == ["n", "5"]
    assert main(["sql", "SELECT * FROM read_text('/etc/passwd')", *args]) != 0
    assert "root:" not in capsys.readouterr().out
    assert main(["status", *args]) == 0  # counts from the bucket, never the secret key
    out = capsys.readouterr().out
    assert "flush_dirs" in out and os.environ["AWS_SECRET_ACCESS_KEY"] not in out


def test_sink_archives_to_s3_exactly_once_through_kill_minus_nine(settings, s3_url):
    s3 = on_s3(settings, s3_url())
    rng = random.Random(7)
    produced: list = []
    stop = threading.Event()

    def producer():
        r = 0
        while not stop.is_set():
            batch = rollout_events(f"k{r}", 40, seed=r)
            produce(settings, batch)
            produced.extend(batch)
            r += 1
            time.sleep(0.3)

    t = threading.Thread(target=producer)
    t.start()
    env = {**os.environ, "KLONG_ARCHIVE_URL": s3.archive_url}
    cmd = [sys.executable, "-m", "klong", "sink", "run", "--home", str(s3.home), "--bootstrap-servers",
           s3.bootstrap_servers, "--topic-prefix", s3.topics.prefix, "-q", "--flush-interval", "0.1"]
    try:
        kills, kills_after_progress = kill_sinks_repeatedly(
            lambda: subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env),
            lambda: len(list_flushes(s3.archive)), rng, kills=KILLS, random_s=(1.0, 4.0))
    finally:
        stop.set()
        t.join()
    assert kills >= KILLS and kills_after_progress >= KILLS // 2, (kills, kills_after_progress)
    Sink(s3).run(until_idle=True)
    n_steps = sum(1 for e in produced if event_type(e) == "step")
    assert raw_counts(s3) == (n_steps, n_steps)  # no event lost, none written twice
    assert raw_counts(s3, "rollout_ended") == (n_steps // 40, n_steps // 40)
    assert [p for p in verify(s3.archive) if p.kind != "stray"] == []
    # every object left is part of a committed flush: the killed writers' unfinished ones were dropped
    dirs = {i.path.rsplit("/", 1)[0] for i in s3.archive.list()}
    assert all(s3.archive.exists(f"{d}/{MANIFEST}") for d in dirs)


KILLS = int(os.environ.get("KLONG_S3_KILLS", "10"))  # the 10; fewer for a quick local run
