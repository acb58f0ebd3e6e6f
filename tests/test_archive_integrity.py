"""A truncated Parquet file in the archive: `klong archive verify` finds it, queries say how to get out,
`klong archive repair` quarantines its flush and re-fetches the offsets from the real broker; when Kafka
no longer has them the flush stays quarantined, queries work and say so."""

from __future__ import annotations

from consumers.sink import Sink
from klong.cli import main
from store.archive import list_flushes
from store.catalog import Catalog, QueryError
from store.integrity import quarantined, verify
from tests.helpers import produce, rollout_events
from tests.test_cli import klong


def _archive_two_flushes(settings):
    produce(settings, rollout_events("r-1", 6))
    Sink(settings).run(until_idle=True)
    produce(settings, rollout_events("r-2", 4))
    Sink(settings).run(until_idle=True)
    return next(d for d in list_flushes(settings.archive_dir) if (d.path / "step.parquet").exists()
                and "r-1" in str(Catalog(settings).scalar(f"SELECT min(rollout_id) FROM read_parquet('{d.path}/step.parquet')")))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_file_is_quarantined_and_refetched(settings, capsys):
    bad = _archive_two_flushes(settings)
    steps = Catalog(settings).scalar("SELECT count(*) FROM steps")
    assert main(klong(settings, "archive", "verify")) == 0
    _truncate(bad.path / "step.parquet")
    try:
        Catalog(settings).scalar("SELECT count(*) FROM steps")
        raise AssertionError("a truncated file should fail the query")
    except QueryError as e:
        assert "klong archive verify" in str(e)
    capsys.readouterr()
    assert main(klong(settings, "archive", "verify")) == 1
    out = capsys.readouterr().out
    assert f"BAD {bad.path.relative_to(settings.archive_dir)}: step.parquet: " in out and "the manifest says" in out
    assert main(klong(settings, "archive", "repair")) == 0
    out = capsys.readouterr().out
    assert "quarantined" in out and "re-fetched from Kafka" in out
    assert verify(settings.archive_dir) == [] and len(quarantined(settings.archive_dir)) == 1
    assert Catalog(settings).scalar("SELECT count(*) FROM steps") == steps  # every step is back
    assert main(klong(settings, "archive", "repair")) == 0 and "nothing to repair" in capsys.readouterr().out


def test_without_kafka_the_flush_stays_quarantined_and_queries_say_so(settings, tmp_path, capsys):
    bad = _archive_two_flushes(settings)
    n_bad = Catalog(settings).scalar(f"SELECT count(*) FROM read_parquet('{bad.path}/step.parquet')")
    steps = Catalog(settings).scalar("SELECT count(*) FROM steps")
    _truncate(bad.path / "step.parquet")
    assert main(klong(settings, "archive", "repair", "--no-refetch")) == 1
    assert "NOT re-fetched" in capsys.readouterr().out
    assert main(klong(settings, "sql", "SELECT count(*) AS n FROM steps", "--format", "csv")) == 0
    captured = capsys.readouterr()
    assert captured.out.split() == ["n", str(steps - n_bad)] and "quarantined" in captured.err
    assert main(klong(settings, "status")) == 0 and "quarantined flush dirs 1" in capsys.readouterr().out
