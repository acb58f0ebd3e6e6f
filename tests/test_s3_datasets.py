"""Dataset builds, replay, the trainer's reader, lineage and the viewer on an archive in a bucket (a real S3
API: SeaweedFS on 127.0.0.1, the `s3_server` fixture), against the same events archived on local disk.

The same events sunk to a local directory and to `s3://bucket/prefix` at the same points build a version
with the same content hash, rows and input set; replay rebuilds it from the bucket (a cached copy that is
not the object is fetched again), and an object that does not match its manifest is a clear error; the
trainer reads the version, `klong lineage` traces a checkpoint to events SQL finds in the bucket, and the
viewer's rollout page renders; no command prints the secret key.
"""

from __future__ import annotations

import dataclasses
import json
import threading

import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from consumers.materialize import build_version
from consumers.sink import Sink
from klong.cli import main
from store.archive import MANIFEST, list_flushes, relative
from store.archive_cache import ArchiveObjectError, cache_dir
from store.catalog import Catalog
from store.datasets import SAMPLES, TOKENS, version_dir
from consumers.replay import replay
from tests.helpers import produce, rollout_events
from tests.test_materialize import task
from trainer.data import DatasetReader
from trainer.model import write_state

pytestmark = pytest.mark.timeout(900)
CFG = {"max_tokens": 1000, "overlap_turns": 1}


@pytest.fixture
def two(settings, s3_url, tmp_path):
    """(local settings, bucket settings): the same events sunk to both at the same points (two sink runs, so
    several flushes per partition); the bucket's home is another directory, holding only its datasets."""
    home = tmp_path / "bucket-home"
    home.mkdir()
    s3 = dataclasses.replace(settings, home=home, archive_url=s3_url())
    batches = [[task("task-a"), task("paper-eval", "eval")] + rollout_events("r0", 30, seed=0) +
               rollout_events("e0", 20, seed=1, task_id="paper-eval"),
               rollout_events("r1", 30, seed=2) + rollout_events("r2", 24, seed=3, group_id="g1") +
               rollout_events("p0", 12, seed=4, end=None)]
    for events in batches:
        produce(settings, events)
        for s in (settings, s3):
            Sink(s).run(until_idle=True, idle_s=0.3)
    return settings, s3


def cli(s, *argv) -> int:
    return main([*argv, "--home", str(s.home), "--bootstrap-servers", s.bootstrap_servers,
                 "--topic-prefix", s.topics.prefix])


def tables(s, ref: str) -> tuple:
    name, version = ref.split("@")
    d = version_dir(s.home, name, int(version))
    return pq.read_table(d / TOKENS), pq.read_table(d / SAMPLES)


def test_a_build_from_the_bucket_is_the_build_from_local_disk(two):
    local, s3 = two
    a = build_version(local.home, "ds", "rl", CFG)
    b = build_version(s3.home, "ds", "rl", CFG, archive=s3.archive)
    assert b.manifest["content_hash"] == a.manifest["content_hash"]
    assert b.manifest["counts"] == a.manifest["counts"] and b.manifest["counts"]["rollouts"] == 3
    assert b.manifest["input"] == a.manifest["input"]  # archive-relative flush names, the same watermark
    assert b.manifest["pending"] == a.manifest["pending"] == ["p0"]
    for x, y in zip(tables(local, a.ref), tables(s3, b.ref)):
        assert x.equals(y)
    assert not (s3.home / "archive").exists()  # nothing was read from (or written to) a local archive
    # nothing new in the bucket: the same version, without a build
    again = build_version(s3.home, "ds", "rl", CFG, archive=s3.archive)
    assert again.existing and again.ref == b.ref


def test_an_object_that_does_not_match_its_manifest_is_a_clear_error(two):
    _, s3 = two
    loc = s3.archive
    flush = next(f for f in list_flushes(loc) if "step" in f.files)
    loc.write_bytes(str(flush.files["step"]), b"PAR1 not the archived bytes PAR1")  # replaced behind the manifest
    with pytest.raises(ArchiveObjectError, match=r"archive object s3://.*/step\.parquet does not match its "
                                                 r"flush's manifest .*klong archive repair"):
        build_version(s3.home, "ds", "rl", CFG, archive=loc)
    assert not (s3.home / "datasets" / "ds").exists()  # no version was published


def test_replay_from_the_bucket_its_cache_and_what_it_lost(two, monkeypatch, capsys):
    _, s3 = two
    b = build_version(s3.home, "ds", "rl", CFG, archive=s3.archive)
    monkeypatch.setenv("KLONG_ARCHIVE_URL", s3.archive_url)
    assert cli(s3, "replay", "ds@1") == 0
    assert f"identical: ds@1 rebuilt from the archive has content hash {b.manifest['content_hash']}" \
        in capsys.readouterr().out
    # a cached copy that is not the object (other bytes of the same size: the CRC finds them), or is gone,
    # is fetched again
    cached = sorted(cache_dir(s3.home, s3.archive).rglob("step.parquet"))
    assert len(cached) > 1, "the build read the bucket through the cache"
    cached[0].write_bytes(b"\0" * cached[0].stat().st_size)
    cached[-1].unlink()
    report = replay(s3, b.ref)
    assert report.identical, report.differences
    assert pq.read_metadata(cached[0]).num_rows > 0 and cached[-1].exists()
    # a flush whose manifest is gone is no longer archived: replay names it
    flush = next(f for f in list_flushes(s3.archive) if "step" in f.files)
    s3.archive.delete(f"{flush.path}/{MANIFEST}")
    assert cli(s3, "replay", "ds@1") == 1
    out = capsys.readouterr().out
    assert "1 recorded flush directories are gone" in out and relative(s3.archive, flush.path) in out


def test_trainer_reader_lineage_and_viewer_on_the_bucket(two, monkeypatch, capsys, tmp_path):
    local, s3 = two
    a = build_version(local.home, "ds", "rl", CFG)
    b = build_version(s3.home, "ds", "rl", CFG, archive=s3.archive)
    # the trainer's reader: the same samples, tokens and advantages as from the local build
    ra, rb = DatasetReader(local.home, a.ref), DatasetReader(s3.home, b.ref)
    assert len(ra) == len(rb) > 0
    for k in range(len(ra)):
        assert all((x == y).all() for x, y in zip(ra.sample(k), rb.sample(k)))  # ids, loss mask
    assert (ra.advantage == rb.advantage).all()

    # `klong lineage`: a checkpoint trained on the bucket's version -> its events, found by SQL in the bucket
    monkeypatch.setenv("KLONG_ARCHIVE_URL", s3.archive_url)
    ckpt = s3.home / "runs" / "run-1" / "checkpoints" / "step-3"
    ckpt.mkdir(parents=True)
    write_state(ckpt, {"run_id": "run-1", "step": 3, "policy_version": 1, "dataset": b.ref,
                       "dataset_hash": b.manifest["content_hash"]})
    assert cli(s3, "lineage", str(ckpt), "--json") == 0
    trace = json.loads(capsys.readouterr().out)
    assert trace["hash_ok"] and trace["flushes"] == b.manifest["input"]["flushes"]
    where = f"SELECT count(*) FROM step_events WHERE {trace['events_where']}"
    n = Catalog(s3).scalar(where)
    assert n == Catalog(local).scalar(where) == 30 + 20 + 30 + 24 + 12

    # the viewer's rollout page, from the bucket: what the local archive's page shows
    from ui.app import create_app

    pages, hits, overlays, plots = [], [], [], []
    for s in (local, s3):
        with TestClient(create_app(s), base_url="http://127.0.0.1") as client:
            r = client.get("/rollouts/r1")
            assert r.status_code == 200, r.text[:500]
            pages.append(r.text)
            assert client.get("/rollouts/nope").status_code == 404
            found = client.get("/search", params={"q": "tool step 7 "})
            assert found.status_code == 200, found.text[:500]
            hits.append(found.text.count("step 7 "))
            ov = client.get("/api/overlay", params={"rollout": "r1", "ref": "ds@1"})  # the version's windows
            assert ov.status_code == 200, ov.text[:500]
            overlays.append({k: v for k, v in ov.json().items() if k != "manifest"})  # manifest: its local path
            plots.append(client.get("/api/plots").json())
        for t in threading.enumerate():  # the app's background figures: done before the bucket's variables go
            if t.name == "klong-ui-plots":
                t.join(300)
    assert "r1" in pages[1] and pages[0].count('class="step') == pages[1].count('class="step') > 0
    assert hits[0] == hits[1] > 0 and overlays[0] == overlays[1] and overlays[1]["steps"]
    assert plots[0] == plots[1] and plots[1]["figures"]


def test_no_command_prints_the_secret_key(two, monkeypatch, capsys, s3_server):
    _, s3 = two
    secret = s3_server.env["AWS_SECRET_ACCESS_KEY"]
    monkeypatch.setenv("KLONG_ARCHIVE_URL", s3.archive_url)
    out = []
    assert cli(s3, "dataset", "build", "ds", "--kind", "rl", "max_tokens=1000", "overlap_turns=1") == 0
    out.append(capsys.readouterr())
    assert cli(s3, "replay", "ds@1") == 0
    out.append(capsys.readouterr())
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + secret)  # a refused request: its error, in one line
    assert cli(s3, "dataset", "build", "ds2", "--kind", "rl", "max_tokens=1000") != 0
    out.append(capsys.readouterr())
    assert f"error: archive {s3.archive_url}: cannot list it" in out[2].err  # one line naming the archive
    text = "".join(o.out + o.err for o in out)
    assert "ds@1" in text and secret not in text
    manifest = (version_dir(s3.home, "ds", 1) / "manifest.json").read_text()
    assert secret not in manifest and s3_server.env["AWS_ACCESS_KEY_ID"] not in manifest
