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
from tests.test_trainer_data import train_home  # noqa: F401  (session fixture)


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


def test_rubric_nodes_memory_is_linear_in_the_tree(settings, tmp_path):
    """20,000 flat leaves through the real import (claim-checked rubric) and the real catalog, in a process
    capped at 1.5 GB of address space: the old recursive view needed ~0.9 GB for 1,000 leaves, growing
    with the square of the child count."""
    import json
    import resource
    import subprocess
    import sys

    rubric = {"id": "root", "requirements": "all", "weight": 1, "sub_tasks": [
        {"id": f"l{i}", "requirements": "criterion " * 20, "weight": 1, "sub_tasks": [],
         "task_category": "Code Development"} for i in range(20_000)]}
    import_tasks(settings, [make_task(tmp_path / "tasks", "wide", rubric=rubric)], "train")
    Sink(settings).run(until_idle=True)
    code = ("import sys; from core.settings import Settings, Topics; from store.catalog import Catalog; "
            "from pathlib import Path; "
            f"s = Settings(home=Path({str(settings.home)!r}), bootstrap_servers='x', topics=Topics({settings.topics.prefix!r})); "
            "print(Catalog(s).scalar(\"SELECT count(*) FILTER (WHERE is_leaf) FROM rubric_nodes WHERE task_id = 'wide'\"))")

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 29, 3 << 29))

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, preexec_fn=cap)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "20000"


def test_one_line_errors_for_bad_inputs(settings, tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_bytes(b"max_tokens: \xff\xfe\n")
    cases = [
        (["dataset", "build", "d", "--kind", "sft", "--config", str(bad_yaml)], "is not UTF-8 text"),
        (["dataset", "build", "d", "--kind", "sft", "max_tokens=100000000000000000000000"], "max_tokens must be"),
        (["dataset", "build", "d", "--kind", "sft", "max_tokens=1e23"], "max_tokens must be"),
    ]
    deep = tmp_path / "deep"
    make_task(tmp_path, "deep")
    text = '{"id":"leaf","requirements":"x","weight":1,"sub_tasks":[],"task_category":"Code Development"}'
    for i in range(1000):
        text = '{"id":"n%d","requirements":"x","weight":1,"sub_tasks":[%s]}' % (i, text)
    (deep / "rubric.json").write_text(text)
    cases.append((["tasks", "import", str(deep), "--split", "train"], "rubric.json: nested too deep"))
    latin = tmp_path / "latin"
    make_task(tmp_path, "latin")
    (latin / "config.yaml").write_bytes(b"id: latin\ntitle: caf\xe9\n")
    cases.append((["tasks", "import", str(latin), "--split", "train"], "config.yaml is not UTF-8 text"))
    for args, message in cases:
        assert main(klong(settings, *args)) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)
    (tmp_path / "file").write_text("x")
    unwritable = tmp_path / "file" / "home"  # under a regular file: nothing can be created there
    assert main(["simulate", "--rollouts", "1", "--home", str(unwritable), "--bootstrap-servers",
                 settings.bootstrap_servers, "--topic-prefix", settings.topics.prefix]) == 2
    err = capsys.readouterr().err
    assert str(unwritable) in err and "Not a directory" in err and len(err.strip().splitlines()) == 1


def test_a_home_that_is_no_data_home_is_an_error(tmp_path, capsys):
    for home in (tmp_path / "typo", tmp_path):  # missing; a directory that holds other things
        (tmp_path / "notes.txt").write_text("not klong")
        for args in (["sql", "SELECT 1"], ["status"], ["dataset", "list"], ["tasks", "list"], ["archive", "verify"]):
            assert main([*args, "--home", str(home)]) == 2, args
            err = capsys.readouterr().err
            assert "data home" in err and str(home) in err


def test_simulate_without_a_broker_fails_after_its_timeout(tmp_path, capsys):
    from services.broker import free_port

    rc = main(["simulate", "--rollouts", "1", "--home", str(tmp_path / "h"), "--bootstrap-servers",
               f"127.0.0.1:{free_port()}", "--connect-timeout", "3"])
    err = capsys.readouterr().err
    assert rc == 2 and "no Kafka answers" in err and "within 3 s" in err


def _interrupt_when(proc, ready, timeout=180.0) -> None:
    import os
    import signal
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not ready():
        time.sleep(0.05)
    assert proc.poll() is None, "finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)


def test_ctrl_c_of_simulate_says_what_was_kept(settings, python_sigint):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "klong", *klong(settings, "simulate", "--rollouts", "500")],
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    spool = settings.outbox_dir
    _interrupt_when(proc, lambda: any(p.stat().st_size > 0 for p in spool.glob("seg-*.log")) if spool.exists() else False)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted. Kept:" in err and str(spool) in err and "Traceback" not in err


def test_ctrl_c_of_train_says_what_was_kept_and_how_to_resume(train_home, python_sigint):
    import subprocess
    import sys

    s = train_home
    before = set((s.home / "runs").iterdir()) if (s.home / "runs").exists() else set()
    proc = subprocess.Popen([sys.executable, "-m", "klong", "train", "--dataset", "sft@1", "--mode", "sft", "--config",
                             "sft_tiny", "data.micro_batch_tokens=1200", "train.epochs=50", "train.max_steps=100000",
                             "train.save_every=2", "--home", str(s.home), "--bootstrap-servers", s.bootstrap_servers,
                             "--topic-prefix", s.topics.prefix],
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _interrupt_when(proc, lambda: any(p.parents[2] not in before for p in
                                      (s.home / "runs").glob("*/checkpoints/step-2/klong_state.json")))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted. Kept: checkpoint" in err and "klong train --resume" in err, err[-2000:]


def test_dataset_build_warns_about_unarchived_events_or_waits_for_them(settings, capsys):
    import threading

    produce(settings, rollout_events("r-a", 6))
    Sink(settings).run(until_idle=True)
    produce(settings, rollout_events("r-b", 6))  # in Kafka, not archived
    assert main(klong(settings, "dataset", "build", "d", "--kind", "sft", "max_tokens=100000")) == 0
    captured = capsys.readouterr()
    assert "warning: Kafka holds" in captured.err and "--wait-archived" in captured.err
    stop = threading.Event()
    sink = threading.Thread(target=lambda: Sink(settings).run(should_stop=stop.is_set), daemon=True)
    sink.start()
    try:
        assert main(klong(settings, "dataset", "build", "d", "--kind", "sft", "max_tokens=100000",
                          "--wait-archived", "120")) == 0
    finally:
        stop.set()
        sink.join(60)
    captured = capsys.readouterr()
    assert captured.out.strip() == "d@2" and "warning" not in captured.err
