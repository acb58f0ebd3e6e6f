"""Dataset versions published to the archive's bucket (store.datasets_s3), on a real S3 API (SeaweedFS on
127.0.0.1, the session's `s3_server`): a version built in one data home is listed, read by the trainer's
reader, exported and traced by `klong lineage` in another home with the same KLONG_ARCHIVE_URL and no
local datasets; a deleted or replaced object of the version is a clear error, a version without its
manifest object is not published, a version that differs here and in the bucket is an error naming both,
and no command prints the secret key.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from consumers.materialize import build_version
from consumers.sink import Sink
from klong.cli import main
from store import datasets as ds
from store.archive import walk
from store.catalog import Catalog
from store.datasets_s3 import key
from tests.helpers import produce, rollout_events
from tests.test_materialize import task
from trainer.data import DatasetReader
from trainer.model import read_state
from trainer.recipe import latest_checkpoint

pytestmark = pytest.mark.timeout(900)
CFG = {"max_tokens": 1000, "overlap_turns": 1}


@pytest.fixture
def homes(settings, s3_url, tmp_path, monkeypatch):
    """(home A, home B): two data homes ("machines") with one archive in a bucket; A sank the events and
    built ds@1 there; B has no datasets. KLONG_ARCHIVE_URL is set for the CLI."""
    url = s3_url()
    a, b = (dataclasses.replace(settings, home=tmp_path / n, archive_url=url) for n in ("home-a", "home-b"))
    for s in (a, b):
        s.home.mkdir()
    produce(settings, [task("task-a")] + rollout_events("r0", 30, seed=0) + rollout_events("r1", 24, seed=2)
            + rollout_events("r2", 12, seed=3, group_id="g1"))
    Sink(a).run(until_idle=True, idle_s=0.3)
    monkeypatch.setenv("KLONG_ARCHIVE_URL", url)
    return a, b


def cli(s, *argv) -> int:
    return main([*argv, "--home", str(s.home), "--bootstrap-servers", s.bootstrap_servers,
                 "--topic-prefix", s.topics.prefix])


def test_a_version_built_on_one_machine_is_used_on_another(homes, capsys, tmp_path, s3_server):
    a, b = homes
    seen = []  # everything the commands printed

    def out() -> str:
        got = capsys.readouterr()
        seen.append(got.out + got.err)
        return got.out
    loc = a.archive
    assert cli(a, "dataset", "build", "ds", "--kind", "rl", "max_tokens=1000", "overlap_turns=1") == 0
    built = json.loads(ds.version_dir(a.home, "ds", 1).joinpath(ds.MANIFEST).read_text())
    # in the bucket: the version's files and its manifest (the same bytes); the archive's readers skip them
    assert loc.read_bytes(key(loc, "ds", 1, ds.MANIFEST)) == ds.version_dir(a.home, "ds", 1).joinpath(ds.MANIFEST).read_bytes()
    assert all(loc.exists(key(loc, "ds", 1, f)) for f in (ds.TOKENS, ds.SAMPLES))
    flushes, strays = walk(loc)
    assert flushes and not strays
    assert cli(a, "archive", "verify") == 0
    assert "ds@1" in out()

    # home B: `dataset list` shows it from the bucket (nothing fetched yet), `dataset show` fetches it
    assert not (b.home / "datasets").exists()
    assert cli(b, "dataset", "list", "--json") == 0
    listed = [json.loads(line) for line in out().splitlines()]
    assert [(m["ref"], m["content_hash"]) for m in listed] == [("ds@1", built["content_hash"])]
    assert not (b.home / "datasets").exists()
    assert cli(b, "dataset", "show", "ds@1", "--json") == 0
    assert json.loads(out())["content_hash"] == built["content_hash"]
    assert ds.version_dir(b.home, "ds", 1) == ds.cache_dir(b.home) / "ds" / "v1"

    # the trainer's reader in B: the same samples as in A
    ra, rb = DatasetReader(a.home, "ds@1"), DatasetReader(b.home, "ds", archive=b.archive)  # NAME: the latest
    assert rb.ref == "ds@1" and rb.content_hash == ra.content_hash and len(ra) == len(rb) > 0
    for k in range(len(ra)):
        assert all((x == y).all() for x, y in zip(ra.sample(k), rb.sample(k)))
    assert (ra.advantage == rb.advantage).all()
    # SQL in B sees the cached version (the lock-down's datasets directory holds the cache)
    assert Catalog(b).scalar("SELECT count(*) FROM samples WHERE dataset = 'ds'") == built["counts"]["samples"]

    # `klong train --dataset ds@1` in B on a fresh cache (fetched again), then `klong lineage` of its
    # checkpoint -> ds@1 -> its events, found by SQL in the bucket
    ds.discard(ds.cache_dir(b.home))
    assert cli(b, "train", "--dataset", "ds@1", "--mode", "rl", "--config", "rl_tiny", "train.max_steps=2",
               "train.save_every=2", "train.log_every=1") == 0
    text = out()
    run_dir = Path(next(line for line in text.splitlines() if line.startswith("run ") and " done: " in line)
                   .split(" done: ")[1])
    ckpt = latest_checkpoint(run_dir)
    assert read_state(ckpt)["dataset_hash"] == built["content_hash"]
    assert cli(b, "lineage", str(ckpt), "--json") == 0
    trace = json.loads(out())
    assert trace["hash_ok"] and trace["flushes"] == built["input"]["flushes"]
    assert Catalog(b).scalar(f"SELECT count(*) FROM step_events WHERE {trace['events_where']}") == 30 + 24 + 12

    # `klong dataset export` in B; then B builds from the same events: the bucket's version, not a new one
    assert cli(b, "dataset", "export", "ds@1", "--format", "trl", "-o", str(tmp_path / "out")) == 0
    assert f"exported ds@1 ({built['content_hash'][:19]}...)" in out()
    assert build_version(b.home, "ds", "rl", CFG, archive=b.archive).ref == "ds@1"
    # a build in B with another config is ds@2 (above the bucket's versions), and A sees it
    two = build_version(b.home, "ds", "rl", {**CFG, "overlap_turns": 2}, archive=b.archive)
    assert two.ref == "ds@2" and not two.existing and loc.exists(key(loc, "ds", 2, ds.MANIFEST))
    assert cli(a, "dataset", "list", "--json") == 0
    assert [json.loads(line)["ref"] for line in out().splitlines()] == ["ds@1", "ds@2"]
    out()
    assert "ds@1" in "".join(seen) and s3_server.env["AWS_SECRET_ACCESS_KEY"] not in "".join(seen)


def test_a_damaged_version_in_the_bucket_is_a_clear_error(homes, capsys, s3_server):
    a, b = homes
    loc = a.archive
    built = build_version(a.home, "ds", "rl", CFG, archive=loc)
    tokens = key(loc, "ds", 1, ds.TOKENS)
    data = loc.read_bytes(tokens)

    # a deleted object: the manifest is there, its tokens are not
    loc.delete(tokens)
    with pytest.raises(ds.DatasetError, match=rf"dataset object s3://{tokens}: missing from the bucket"):
        DatasetReader(b.home, "ds@1", archive=b.archive)
    assert cli(b, "dataset", "show", "ds@1") != 0
    err = capsys.readouterr().err
    assert f"s3://{tokens}: missing from the bucket" in err and len(err.strip().splitlines()) == 1
    assert s3_server.env["AWS_SECRET_ACCESS_KEY"] not in err
    assert not ds.versions(b.home, "ds")  # nothing half-fetched is used

    # a replaced object: other bytes behind the manifest fail the content hash
    samples = key(loc, "ds", 1, ds.SAMPLES)
    loc.write_bytes(tokens, data)
    other = build_version(a.home, "other", "rl", {**CFG, "overlap_turns": 2}, archive=loc)
    loc.write_bytes(samples, loc.read_bytes(key(loc, "other", other.manifest["version"], ds.SAMPLES)))
    with pytest.raises(ds.DatasetError, match=r"_datasets/ds/v1/: its files do not match its manifest's content "
                                              r"hash .* the version in the bucket is damaged"):
        DatasetReader(b.home, "ds@1", archive=b.archive)

    # a version without its manifest object is not published; building it again in A uploads it again
    loc.write_bytes(samples, (ds.version_dir(a.home, "ds", 1) / ds.SAMPLES).read_bytes())
    loc.delete(key(loc, "ds", 1, ds.MANIFEST))
    assert cli(b, "dataset", "list", "--json") == 0
    assert [json.loads(line)["ref"] for line in capsys.readouterr().out.splitlines()] == ["other@1"]
    with pytest.raises(ds.DatasetError, match="no dataset named 'ds'"):
        DatasetReader(b.home, "ds@1", archive=b.archive)
    assert build_version(a.home, "ds", "rl", CFG, archive=loc).existing
    assert DatasetReader(b.home, "ds@1", archive=b.archive).content_hash == built.manifest["content_hash"]


def test_a_version_that_differs_here_and_in_the_bucket_is_an_error_naming_both(homes, capsys):
    a, b = homes
    built = build_version(a.home, "ds", "rl", CFG, archive=a.archive)
    # B built its own ds@1 before it used the bucket (here: another config over the same events)
    mine = build_version(b.home, "ds", "rl", {**CFG, "overlap_turns": 2}, archive=a.archive)
    assert mine.ref == "ds@2"  # with the bucket in use, numbers never collide ...
    local = ds.version_dir(b.home, "ds", 2)
    local.rename(ds.datasets_dir(b.home) / "ds" / "v1")  # ... so make the collision by hand
    m = json.loads((ds.datasets_dir(b.home) / "ds" / "v1" / ds.MANIFEST).read_text())
    m.update(version=1, ref="ds@1")  # not hashed: the content hash stays the one B's build computed
    (ds.datasets_dir(b.home) / "ds" / "v1" / ds.MANIFEST).write_text(json.dumps(m))
    assert m["content_hash"] != built.manifest["content_hash"]
    both = (rf"ds@1 differs between {ds.datasets_dir(b.home) / 'ds' / 'v1'} \(content hash {m['content_hash']}\) "
            rf"and s3://.*/_datasets/ds/v1/ \(content hash {built.manifest['content_hash']}\)")
    with pytest.raises(ds.DatasetError, match=both):
        DatasetReader(b.home, "ds@1", archive=b.archive)
    for argv in (("dataset", "show", "ds@1"), ("dataset", "list")):
        assert cli(b, *argv) != 0
        assert "ds@1 differs between" in capsys.readouterr().err
    # without the bucket, B's own version is read as before (the local default is unchanged)
    assert DatasetReader(b.home, "ds@1").content_hash == m["content_hash"]
