"""The command line explains itself: every `klong ... --help` page has a description and every option a help
text; `klong sql --views` lists the user views with their columns; a mistyped view gets the closest name;
csv lines end in \\n, json is one array, ndjson a line per row."""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys

import pytest

from klong.cli import build_parser, main
from tests.helpers import produce, rollout_events


def pages(parser: argparse.ArgumentParser, path=("klong",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from pages(sub, path + (name,))


def test_every_help_page_has_a_description_and_every_option_help(capsys):
    seen = list(pages(build_parser()))
    assert len(seen) > 30
    for path, parser in seen:
        with pytest.raises(SystemExit) as done:
            main([*path[1:], "--help"])
        assert done.value.code == 0
        text = capsys.readouterr().out
        assert parser.description, f"{' '.join(path)}: no description"
        first = " ".join(parser.description.split()[:4])
        assert first in " ".join(text.split()), f"{' '.join(path)}: the description is not on the page"
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, \
                f"{' '.join(path)} {action.option_strings or action.dest}: no help text"
    # and the real entry point prints the same
    out = subprocess.run([sys.executable, "-m", "klong", "dataset", "export", "--help"], capture_output=True,
                         text=True, timeout=600)  # a loaded 2-core machine imports torch slowly
    assert out.returncode == 0 and "--messages" in out.stdout and "Writes every sample" in out.stdout


def klong(settings, *args):
    return main([*args, "--home", str(settings.home), "--bootstrap-servers", settings.bootstrap_servers,
                 "--topic-prefix", settings.topics.prefix, "-q"])


def test_sql_views_suggestions_and_formats(settings, capsys):
    from consumers.sink import Sink

    produce(settings, rollout_events("r,1", 4) + rollout_events("r2", 4))
    Sink(settings).run(until_idle=True, idle_s=0.3)
    assert klong(settings, "sql", "--views") == 0
    views = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert {"rollouts", "steps", "step_tokens", "samples", "datasets", "rl_iterations", "judge_results"} <= set(views)
    assert not [v for v in views if v.startswith("_")]
    assert views["rollouts"].startswith("rollout_id VARCHAR, task_id VARCHAR") and "final_score DOUBLE" in views["rollouts"]

    assert klong(settings, "sql", "SELECT * FROM rollout") == 2
    assert "did you mean `rollouts`?" in capsys.readouterr().err
    assert klong(settings, "sql", "SELECT * FROM sampels") == 2
    assert "did you mean `samples`?" in capsys.readouterr().err
    assert klong(settings, "sql") == 2 and "--views" in capsys.readouterr().err

    q = "SELECT rollout_id, n_steps, 'a\nb' AS text FROM rollouts ORDER BY rollout_id"
    assert klong(settings, "sql", q, "--format", "csv") == 0
    out = capsys.readouterr().out
    assert "\r" not in out and out.endswith("\n")
    assert list(csv.reader(io.StringIO(out))) == [["rollout_id", "n_steps", "text"], ["r,1", "4", "a\\nb"], ["r2", "4", "a\\nb"]]
    assert klong(settings, "sql", q, "--format", "json") == 0
    assert json.loads(capsys.readouterr().out) == [{"rollout_id": "r,1", "n_steps": 4, "text": "a\nb"},
                                                   {"rollout_id": "r2", "n_steps": 4, "text": "a\nb"}]
    assert klong(settings, "sql", q, "--format", "ndjson") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["rollout_id"] == "r,1"
    assert klong(settings, "sql", "SELECT 1 AS x WHERE false", "--format", "json") == 0
    assert json.loads(capsys.readouterr().out) == []
