"""The `klong` commands of the README, run through the real CLI against the real broker."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pyarrow.parquet as pq
import pytest

from consumers.sink import Sink
from services.broker import free_port
from klong.cli import main
from schemas.events import encode
from tests.helpers import produce, rollout_events

ROOT = Path(__file__).resolve().parents[1]


def klong(settings, *args):
    return ["--home", str(settings.home), "--bootstrap-servers", settings.bootstrap_servers,
            "--topic-prefix", settings.topics.prefix, *args]


def test_schemas_export_validates_real_events(tmp_path, capsys):
    assert main(["schemas", "export", str(tmp_path / "js")]) == 0
    schemas = {p.name.split(".")[0]: json.loads(p.read_text()) for p in (tmp_path / "js").glob("*.schema.json")}
    assert {"step", "rollout_started", "rollout_ended", "judge_result", "task_registered", "events"} <= set(schemas)
    for ev in rollout_events("r", 6):
        doc = json.loads(encode(ev))
        jsonschema.validate(doc, schemas["events"])
        jsonschema.validate(doc, schemas[doc["event_type"]])
    bad = json.loads(encode(rollout_events("r", 3)[2]))
    bad["payload"]["role"] = "wizard"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schemas["step"])


def test_broker_start_status_stop(tmp_path):
    home = str(tmp_path / "h")
    port = str(free_port())
    run = lambda *a: subprocess.run([sys.executable, "-m", "klong", *a, "--home", home],  # noqa: E731
                                    capture_output=True, text=True, timeout=60)
    started = run("broker", "start", "--port", port)
    try:
        assert started.returncode == 0, started.stderr
        assert f"127.0.0.1:{port}" in started.stdout
        assert run("broker", "status").returncode == 0
        # the home now knows its broker: commands find it without --bootstrap-servers
        status = run("status", "--json")
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        assert report["settings"]["bootstrap_servers"] == f"127.0.0.1:{port}"
        assert {p["topic"] for p in report["partitions"]} >= {"klong.rollouts", "klong.judge.results"}
    finally:
        stopped = run("broker", "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert run("broker", "status").returncode == 1


def test_sql_formats_and_errors(settings, tmp_path, capsys):
    produce(settings, [e for r in range(3) for e in rollout_events(f"r{r}", 8, seed=r)])
    Sink(settings).run(until_idle=True)
    q = "SELECT rollout_id, n_steps, status FROM rollouts ORDER BY rollout_id"
    assert main(klong(settings, "sql", q)) == 0
    out = capsys.readouterr().out
    assert "r0" in out and "(3 rows)" in out
    assert main(klong(settings, "sql", q, "--format", "csv")) == 0
    assert capsys.readouterr().out.splitlines() == ["rollout_id,n_steps,status", "r0,8,finished", "r1,8,finished", "r2,8,finished"]
    assert main(klong(settings, "sql", q, "--format", "json")) == 0
    rows = json.loads(capsys.readouterr().out)  # one JSON array
    assert rows[1] == {"rollout_id": "r1", "n_steps": 8, "status": "finished"}
    assert main(klong(settings, "sql", q, "--format", "ndjson")) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == rows
    out_file = tmp_path / "x.parquet"
    assert main(klong(settings, "sql", "SELECT * FROM step_tokens", "--format", "parquet", "-o", str(out_file))) == 0
    assert pq.read_table(out_file).num_rows == 24
    assert main(klong(settings, "sql", "DROP VIEW steps")) == 2
    assert "read-only" in capsys.readouterr().err
    assert main(klong(settings, "sql", "SELECT nope FROM steps")) == 2
    assert "nope" in capsys.readouterr().err


def test_status_reports_lag_and_counts(settings, capsys):
    produce(settings, rollout_events("s0", 10))
    assert main(klong(settings, "status", "--json")) == 0
    report = json.loads(capsys.readouterr().out)
    # Tansu reports a partition's end as the last *batch's* base offset + 1, so lag is a lower bound there
    lagging = {p["topic"] for p in report["partitions"] if p["lag"] > 0}
    assert lagging == {settings.topics.rollouts, settings.topics.judge_results}
    Sink(settings).run(until_idle=True)
    assert main(klong(settings, "status", "--json")) == 0
    report = json.loads(capsys.readouterr().out)
    assert sum(p["lag"] for p in report["partitions"]) == 0
    assert report["archive"]["steps"] == 10 and report["archive"]["rollouts"] == 1


def test_missing_broker_is_a_clear_error(tmp_path, capsys):
    assert main(["sink", "run", "--until-idle", "--home", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "klong broker start" in err and "--bootstrap-servers" in err


def test_simulate_then_sink_then_sql(settings, capsys):
    assert main(klong(settings, "simulate", "--rollouts", "6", "--seed", "3", "--min-turns", "20", "--max-turns", "40", "-q")) == 0
    assert "simulated 6 rollouts" in capsys.readouterr().out
    assert main(klong(settings, "sink", "run", "--until-idle", "-q")) == 0
    assert "dead letters" in capsys.readouterr().out
    assert main(klong(settings, "sql", "SELECT count(*) AS n, count(DISTINCT group_id) AS g FROM rollouts", "--format", "json")) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["n"] == 6 and row["g"] >= 2
    # the pinned prefix comes first in every rollout
    assert main(klong(settings, "sql", "SELECT count(*) AS bad FROM steps s JOIN (SELECT rollout_id, min(step_idx) "
                      "FILTER (WHERE NOT pinned) AS first_free FROM steps GROUP BY 1) f USING (rollout_id) "
                      "WHERE s.pinned AND s.step_idx > f.first_free", "--format", "json")) == 0
    assert json.loads(capsys.readouterr().out) == [{"bad": 0}]


def test_demo_runs_end_to_end(tmp_path):
    home = tmp_path / "demo"
    out = subprocess.run([sys.executable, "-m", "klong", "demo", "--simulated", "--home", str(home), "--rollouts", "4",
                          "--port", str(free_port())], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Score by status" in out.stdout and "broker stopped" in out.stdout
    assert "0 dead letters" in out.stdout
    assert not (home / "broker.json").exists()


def test_the_command_exits_with_mains_code_after_its_output_and_exit_handlers(settings):
    """`klong` ends through `klong.cli.run` (os._exit after Python's shutdown steps, so no native thread pool is
    torn down at exit): the result is printed in full, the exit code is main()'s, and atexit handlers still ran
    (the SQL spill directory of the process is gone)."""
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    (settings.home / "archive").mkdir()  # a data home, with nothing archived yet
    ok = subprocess.run([sys.executable, "-m", "klong", *klong(settings, "sql", "SELECT range AS n FROM range(3000)",
                                                                 "--format", "csv")],
                        capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.split() == ["n", *map(str, range(3000))]
    spill = settings.home / "tmp" / "sql"
    assert spill.is_dir() and not any(spill.iterdir())  # made at connect, removed by an atexit handler
    bad = subprocess.run([sys.executable, "-m", "klong", *klong(settings, "sql", "SELECT * FROM nope")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "nope" in bad.stderr
