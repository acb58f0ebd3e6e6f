"""The command line as a newcomer meets it: `klong train` prints RUN_DIR= first and its run is in SQL when it
returns while a sink runs (else it says to run one); Ctrl-C is one line, never a traceback, and leaves no
half-built dataset; `dataset build` shows progress on a terminal only; example configs are found from any
directory; help pages speak of commands, not of Python modules."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

from consumers.sink import Sink
from klong.cli import main
from store.catalog import Catalog
from store.datasets import all_manifests, report_progress
from tests.test_cli_help import pages
from tests.test_trainer_data import train_home  # noqa: F401  (session fixture)
from tests.test_trainer_run import klong

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", "sft_tiny", "data.micro_batch_tokens=1200", "train.max_steps=1", "optim.warmup_steps=0"]


def test_train_prints_run_dir_first_and_is_in_sql_when_it_returns_while_a_sink_runs(train_home, capsys):
    s = train_home
    Sink(s).run(until_idle=True, idle_s=0.3)  # what earlier tests left in Kafka
    assert main(klong(s, "train", "--dataset", "sft@1", *TINY)) == 0
    out, err = capsys.readouterr()
    first = out.splitlines()[0]
    assert first.startswith("RUN_DIR=") and (Path(first[len("RUN_DIR="):]) / "checkpoints" / "step-1").is_dir(), out
    assert "`klong sink run --until-idle` archives them" in err  # no sink ran: it says what to run

    stop = threading.Event()
    sink = threading.Thread(target=lambda: Sink(s).run(should_stop=stop.is_set), daemon=True)
    sink.start()
    try:
        assert main(klong(s, "train", "--dataset", "sft@1", *TINY)) == 0
        out, err = capsys.readouterr()
        run_id = Path(out.splitlines()[0].split("=", 1)[1]).name
        rows = Catalog(s).arrow(f"SELECT status, steps FROM training_runs WHERE run_id = '{run_id}'").to_pylist()
        assert rows == [{"status": "finished", "steps": 1}], (rows, err)  # there the moment klong train returned
        assert "sink run" not in err
    finally:
        stop.set()
        sink.join(timeout=60)


def test_ctrl_c_in_dataset_build_is_one_line_and_publishes_nothing(train_home, capsys, python_sigint):
    s = train_home
    before = [m["ref"] for m in all_manifests(s.home)]

    def interrupt(rollouts, tokens):  # a real SIGINT, in the middle of writing the version
        os.kill(os.getpid(), signal.SIGINT)

    with report_progress(interrupt):
        rc = main(klong(s, "dataset", "build", "halfway", "--kind", "sft", "max_tokens=4096"))
    err = capsys.readouterr().err
    assert rc == 130
    assert err.strip().splitlines()[-1] == ("klong dataset build: interrupted; no version of halfway was published "
                                            "(a build is all or nothing)")
    assert "Traceback" not in err
    assert [m["ref"] for m in all_manifests(s.home)] == before
    assert not list((s.home / "datasets" / "_tmp").glob("*"))  # the half-written build was discarded


def test_ctrl_c_anywhere_else_is_one_line(train_home, capsys, monkeypatch, python_sigint):
    from store import catalog

    def interrupted(self, query):
        os.kill(os.getpid(), signal.SIGINT)
        threading.Event().wait(30)  # the signal arrives here

    monkeypatch.setattr(catalog.Catalog, "arrow", interrupted)
    assert main(klong(train_home, "sql", "SELECT 1")) == 130
    err = capsys.readouterr().err
    assert err == "klong sql: interrupted (Ctrl-C); nothing after this point was done\n"


def _on_a_terminal(argv: list[str], env: dict) -> str:
    """Runs argv with stdout and stderr on a pseudo-terminal of 120 columns; returns what it showed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the terminal closed: the process is done
            break
        if not chunk:
            break
        shown += chunk
    assert proc.wait(timeout=300) == 0, shown.decode(errors="replace")
    os.close(master)
    return shown.decode(errors="replace")


def test_build_shows_progress_on_a_terminal_only_and_finds_the_example_config_from_anywhere(train_home, tmp_path):
    s = train_home
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "klong", *klong(s, "dataset", "build", "shown", "--kind", "sft", "--config",
                                                  "examples/sft.yaml", "max_tokens=4096")]
    shown = _on_a_terminal(argv, env)
    assert re.search(r"building shown: \d+ rollouts .*tokens", shown), shown
    assert "shown@1" in shown
    piped = subprocess.run([*argv, "overlap_turns=1"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)  # tmp_path has no examples/: found from the package
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == "shown@2\n" and "building" not in piped.stderr
    q = _on_a_terminal([*argv[:3], *klong(s, "-q", "dataset", "build", "shown", "--kind", "sft", "max_tokens=4096",
                                           "overlap_turns=3")], env)
    assert "building" not in q


def test_help_pages_speak_of_commands_not_modules():
    from klong.cli import build_parser

    module = re.compile(r"\((?:schemas|producers|consumers|store|trainer|klong)\.[a-z_.]+|The library is|Thin:")
    for path, parser in pages(build_parser()):
        assert not module.search(parser.description or ""), f"{' '.join(path)}: {parser.description}"


def test_replay_shows_progress_on_a_terminal(train_home):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    shown = _on_a_terminal([sys.executable, "-m", "klong", *klong(train_home, "replay", "sft@1")], env)
    assert re.search(r"rebuilding: \d+ rollouts", shown) and "identical: sft@1" in shown, shown


def test_a_command_run_in_process_leaves_no_signal_handler_behind(settings):
    """`klong sink run` routes Ctrl-C to a clean stop while it runs, then puts the handlers back: a later
    Ctrl-C in the same process (the demo, a test) is a KeyboardInterrupt again, not a stop flag nobody reads."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert main(klong(settings, "sink", "run", "--until-idle", "--quiet")) == 0
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_shipped_tasks_are_found_from_any_directory(settings, tmp_path):
    """README's `klong tasks import tasks/...` lines (a glob no shell expanded included) from a directory
    that has no tasks/ of its own read the shipped tasks; a real path of the user's still comes first."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "klong", *klong(settings, "tasks", "import", *a)],  # noqa: E731
                                    cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = run("tasks/answer-file", "tasks/family/train/*", "--split", "train")
    assert out.returncode == 0, out.stderr
    n_train = len([d for d in (ROOT / "tasks" / "family" / "train").iterdir() if d.is_dir()])
    assert out.stdout.count("registered ") == 1 + n_train, out.stdout
    missing = run("tasks/no-such-task", "--split", "train")
    assert missing.returncode != 0 and "no-such-task" in missing.stderr
