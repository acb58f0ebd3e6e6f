"""`klong sql` and `Catalog.sql` can only read the data: the probes that got through before (an archive
file overwritten by EXPLAIN ANALYZE COPY, /etc/passwd, glob, the process environment, an extension
install, a later SET) are refused, on a real archive in real DuckDB."""

from __future__ import annotations

import hashlib

import pytest

from consumers.sink import Sink
from klong.cli import main
from store.archive import archived_files
from store.catalog import Catalog, QueryError
from tests.helpers import produce, rollout_events
from tests.test_cli import klong


@pytest.fixture
def archived(settings):
    produce(settings, rollout_events("r-1", 6))
    Sink(settings).run(until_idle=True)
    return settings


def _digest(files) -> dict:
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_probes_cannot_write_or_read_outside_the_data(archived, monkeypatch, capsys):
    monkeypatch.setenv("KLONG_KAFKA_SASL_PASSWORD", "s3cret-sql-probe")
    cat = Catalog(archived)
    steps = archived_files(archived.archive_dir)["step"]
    before = _digest(steps)
    target = steps[0]
    probes = [
        f"EXPLAIN ANALYZE COPY (SELECT * FROM step_events LIMIT 1) TO '{target}' (FORMAT parquet)",
        f"explain (analyze) COPY (SELECT 1) TO '{target}'",
        f"EXPLAIN /* c */ ANALYSE COPY (SELECT 1) TO '{target}'",
        f"EXPLAIN COPY (SELECT 1) TO '{target}'",
        f"COPY (SELECT 1) TO '{target}'",
        "SELECT * FROM read_text('/etc/passwd')",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_blob('/proc/self/environ')",
        "SELECT * FROM glob('/etc/*')",
        f"SELECT * FROM glob('{archived.home}/*')",
        f"SELECT * FROM read_text('{archived.home}/broker.json')",
        "EXPLAIN ANALYZE INSTALL httpfs",
        "INSTALL httpfs",
        "SET enable_external_access = true",
        "SELECT 1; SET lock_configuration = false",
        "ATTACH ':memory:' AS m",
    ]
    for q in probes:
        with pytest.raises(QueryError):
            cat.sql(q)
        assert main(klong(archived, "sql", q)) == 2
    err = capsys.readouterr().err
    assert "s3cret" not in err and "root:" not in err
    assert _digest(steps) == before  # the archive is untouched
    con = cat.connect()
    with pytest.raises(Exception, match="(?i)lock|configuration"):
        con.execute("SET enable_external_access = true")  # the Python API's raw connection is locked too


def test_reading_the_data_still_works(archived, capsys):
    cat = Catalog(archived)
    assert cat.scalar("SELECT count(*) FROM steps") == 6
    assert cat.scalar(f"SELECT count(*) FROM read_parquet('{archived.archive_dir}/**/*.parquet')") > 0
    assert cat.sql("EXPLAIN SELECT * FROM rollouts").height >= 1
    assert main(klong(archived, "sql", "SELECT rollout_id, status FROM rollouts", "--format", "csv")) == 0
    assert "r-1,finished" in capsys.readouterr().out


def test_duckdb_temp_directory_is_in_the_data_home_and_exposes_nothing(archived, tmp_path, monkeypatch):
    """DuckDB adds its temp directory to allowed_directories; by default that is `<cwd>/.tmp/`, which made
    whatever a user kept there readable by SQL. The spill directory is now a per-process one in the data home."""
    cwd = tmp_path / "cwd"
    (cwd / ".tmp").mkdir(parents=True)
    (cwd / ".tmp" / "secret.txt").write_text("s3cret-tmp")
    monkeypatch.chdir(cwd)
    cat = Catalog(archived)
    con = cat.connect()
    spill = con.execute("SELECT current_setting('temp_directory')").fetchone()[0]
    assert spill.startswith(str(archived.home / "tmp" / "sql")), spill
    other = archived.home / "tmp" / "sql" / "otherhost-1"  # another process's spill directory
    other.mkdir(parents=True)
    (other / "x.txt").write_text("s3cret-other")
    for q in [f"SELECT content FROM read_text('{cwd}/.tmp/secret.txt')", "SELECT content FROM read_text('.tmp/secret.txt')",
              f"SELECT content FROM read_text('{other}/x.txt')", f"SELECT * FROM glob('{archived.home}/tmp/sql/*')"]:
        with pytest.raises(QueryError):
            cat.sql(q)
    assert cat.scalar("SELECT count(*) FROM steps") == 6
