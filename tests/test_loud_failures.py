"""Loud failures: what used to pass silently (or with a traceback) now stops with a one-line error that
names the input, through the real CLI, the real broker and the real archive."""

from __future__ import annotations

import pytest

from consumers.sink import Sink
from klong.cli import main
from producers.judge_requests import store_snapshot
from producers.tasks import import_tasks
from tests.helpers import produce, rollout_events
from tests.test_cli import klong
from tests.test_judge import read_results, request
from tests.test_tasks import make_task


@pytest.fixture
def judged_home(settings, tmp_path):
    import_tasks(settings, [make_task(tmp_path / "tasks", "lt")], "train")
    produce(settings, rollout_events("r-lt", 6, task_id="lt", score=None))
    Sink(settings).run(until_idle=True)
    return settings


def test_judge_request_checks_rollout_task_and_snapshot(judged_home, tmp_path, capsys):
    s = judged_home
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "a.py").write_text("x = 1\n")
    cases = [
        (["--rollout", "r-lt", "--task", "nope", "--snapshot", str(sub)], "task 'nope' is not registered"),
        (["--rollout", "r-none", "--task", "lt", "--snapshot", str(sub)], "rollout 'r-none' is not in the archive"),
        (["--rollout", "r-lt", "--task", "lt"], "no archived snapshot"),
        (["--rollout", "r-lt", "--task", "lt", "--snapshot", "sha256:" + "0" * 64], "is not in"),
        (["--rollout", "r-lt", "--task", "lt", "--snapshot", str(tmp_path / "missing")], "no such directory"),
    ]
    for args, message in cases:
        assert main(klong(s, "judge", "request", *args)) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert main(klong(s, "judge", "request", "--rollout", "r-lt", "--task", "lt", "--snapshot", str(sub))) == 0
    assert main(klong(s, "judge", "request", "--rollout", "r-x", "--task", "lt", "--unchecked")) == 0


def test_judge_run_against_a_dead_endpoint_errors_without_zeros(judged_home, tmp_path, capsys):
    s = judged_home
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "a.py").write_text("x = 1\n")
    produce(s, [request("r-lt", "lt", ref=store_snapshot(s, sub))])
    rc = main(klong(s, "judge", "run", "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--until-idle",
                    "--max-attempts", "2"))
    err = capsys.readouterr().err
    assert rc == 2 and "kept failing" in err and "gave up after 2 attempts" in err
    assert read_results(s) == []  # no result of invalid zeros: the request waits for a working endpoint
