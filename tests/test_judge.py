"""The judge worker against the real broker, with a local OpenAI-compatible stub standing in for the model:
grading and aggregation, retries, invalid leaves, priority under load, kill -9 and restart, CLI."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter

import numpy as np
import pytest
from kafka import KafkaConsumer, TopicPartition

from consumers.grading import (EndpointConfigError, EndpointError, GraderConfig, LeafGrade, SubmissionError, load_submission,
                               parse_verdict, relevant_files)
from consumers.judge import JudgeConfig, JudgeWorker, build_result
from consumers.judge_queue import Job, Ledger, Scheduler
from consumers.sink import Sink
from klong.cli import main
from producers.judge_requests import request_judgment, store_snapshot
from producers.outbox import Outbox
from producers.tasks import import_tasks, read_topic
from schemas.claimcheck import MAX_EVENT_BYTES
from schemas.events import (JudgeRequested, JudgeRequestedPayload, JudgeResult, Snapshot, SnapshotPayload,
                            encode, new_event)
from schemas.rubric import aggregate
from store.catalog import Catalog
from tests.helpers import produce, wait_for
from tests.openai_stub import StubModel
from tests.test_rubric import leaf, parent
from tests.test_tasks import klong, make_task


@pytest.fixture
def stub():
    with StubModel() as s:
        yield s


def grader(stub, **kw) -> GraderConfig:
    # 20 s: a stub call takes milliseconds, but a loaded 2-core machine must not time one out (a retry would
    # change the call counts the tests check); the timeout test sets its own
    cfg = dict(base_url=stub.url, model="stub-judge", timeout_s=20.0, backoff_min_s=0.01, backoff_max_s=0.05,
               max_attempts=3)
    return GraderConfig(**{**cfg, **kw})


def request(rollout_id, task_id, priority="train", step=3, ref=None, request_id=None) -> JudgeRequested:
    return new_event(JudgeRequested, rollout_id=rollout_id, payload=JudgeRequestedPayload(
        request_id=request_id or f"req-{rollout_id}", step_idx=step, task_id=task_id, priority=priority,
        snapshot_ref=ref))


def read_results(settings) -> list[JudgeResult]:
    return [ev for ev in read_topic(settings, settings.topics.judge_results) if isinstance(ev, JudgeResult)]


def snapshot(settings, tmp_path, files: dict) -> str:
    d = tmp_path / f"sub-{len(files)}-{abs(hash(tuple(files)))}"
    for name, text in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)
    return store_snapshot(settings, d)


# ---- end to end ------------------------------------------------------------------------------------------


def test_grades_every_leaf_aggregates_and_emits_one_result_per_request(settings, stub, tmp_path, capsys):
    tree = parent("root", [
        parent("impl", [leaf("train loop [score=1]"), leaf("loss [score=0]"), leaf("data [prose=1]")], weight=2),
        leaf("logs [garbage]", cat="Result Analysis"),
        leaf("fig [score=1]", weight=0, cat="Code Execution"),
    ])
    make_task(tmp_path / "tasks", "paper-x", rubric=tree, paper="# Paper X\nWe train a tiny model.",
              addendum_md="Use seed 7.")
    import_tasks(settings, [tmp_path / "tasks" / "paper-x"], "train")
    ref = snapshot(settings, tmp_path, {"train.py": "def train_loop():\n    pass\n", "reproduce.log": "epoch 1 done"})
    # a rollout with a snapshot in the archive: a request without snapshot_ref uses it
    produce(settings, [new_event(Snapshot, rollout_id="r-snap", payload=SnapshotPayload(step_idx=5, ref=ref))])
    Sink(settings).run(until_idle=True)
    reqs = [request("r1", "paper-x", ref=ref), request("r2", "paper-x", "eval", ref=ref),
            request("r-snap", "paper-x", step=9),  # latest archived snapshot at or before step 9
            request("r-nope", "no-such-task", ref=ref), request("r-nosnap", "paper-x", step=2)]
    produce(settings, reqs + [reqs[0]],  # a producer resend of r1: still one result
            raw=[(settings.topics.judge_train, b"k", b"not an event")])
    stats = JudgeWorker(settings, grader(stub), JudgeConfig(concurrency=3, idle_s=0.3)).run(until_idle=True)
    assert (stats.results, stats.bad_messages) == (5, 1)

    results = {r.payload.request_id: r.payload for r in read_results(settings)}
    assert set(results) == {"req-r1", "req-r2", "req-r-snap", "req-r-nope", "req-r-nosnap"}
    # hand-computed: impl = (1 + 0 + 1) / 3; root = (2 * 2/3 + 1 * 0 + 0 * 1) / 3 = 4/9
    for rid in ("req-r1", "req-r2", "req-r-snap"):
        r = results[rid]
        assert r.valid and r.score == pytest.approx(4 / 9) and r.judge_model == "stub-judge"
        by_leaf = {ls.id: ls for ls in r.leaf_scores}
        assert {k: (v.score, v.valid) for k, v in by_leaf.items()} == {
            "train loop [score=1]": (1, True), "loss [score=0]": (0, True), "data [prose=1]": (1, True),
            "logs [garbage]": (0, False), "fig [score=1]": (1, True)}
        assert r.n_invalid_leaves == 1 and "invalid answer" in by_leaf["logs [garbage]"].explanation
        assert r.prompt_tokens > 0 and r.completion_tokens == 100 and r.latency_s > 0
    assert not results["req-r-nope"].valid and "not registered" in results["req-r-nope"].error
    assert not results["req-r-nosnap"].valid and "no archived snapshot" in results["req-r-nosnap"].error
    # the prompt carried the paper, the addendum, the file listing and the relevant file
    prompt_calls = [c for c in stub.calls if "train loop" in c.criterion]
    assert all("train.py" in c.prompt and "def train_loop" in c.prompt for c in prompt_calls)
    assert len(stub.calls) == 3 * 5  # 5 leaves for each of the 3 gradable requests, nothing graded twice

    Sink(settings).run(until_idle=True)
    cat = Catalog(settings)
    q = cat.sql("SELECT request_id, priority, status, n_results, score FROM judge_queue ORDER BY request_id")
    assert q["status"].to_list() == ["judged"] * 5 and q["n_results"].to_list() == [1] * 5
    assert cat.scalar("SELECT count(*) FROM judge_leaf_scores WHERE NOT valid") == 3
    assert cat.scalar("SELECT score FROM judge_results WHERE request_id = 'req-r2'") == pytest.approx(4 / 9)
    assert main(klong(settings, "judge", "status", "--json")) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["archive"]["train"]["judged"] == 4 and status["archive"]["eval"]["judged"] == 1
    assert status["kafka_backlog"] == {"eval": 0, "train": 0}
    assert status["invalid_leaf_rate"] == pytest.approx(3 / 15)
    assert main(klong(settings, "judge", "status")) == 0
    assert "invalid-leaf rate: 20.00%" in capsys.readouterr().out

    # a second worker finds everything judged (committed offsets, ledger, archive): no new result
    again = JudgeWorker(settings, grader(stub), JudgeConfig(concurrency=2, idle_s=0.2)).run(until_idle=True)
    assert again.results == 0 and len(stub.calls) == 15


def test_retries_transient_errors_and_counts_invalid_leaves(settings, stub, tmp_path, monkeypatch, caplog):
    stub.timeout_sleep = 60.0  # the client's 4 s fire first; 4 s is 5x what a loaded machine needs for a call
    monkeypatch.setenv("OPENAI_API_KEY", "sk-judge-secret")
    caplog.set_level("DEBUG")
    flaky = parent("root", [leaf("a [500x2] [score=1]"), leaf("b [429x2] [score=1]"),
                            leaf("c [timeoutx1] [score=1]"), leaf("d [badbodyx2] [score=1]"),
                            leaf("e [half]"), leaf("f [garbage]")])
    down = parent("root", [leaf("g [score=1]"), leaf("h [500x99]")])
    make_task(tmp_path, "flaky", rubric=flaky)
    make_task(tmp_path, "down", rubric=down)
    import_tasks(settings, [tmp_path / "flaky", tmp_path / "down"], "train")
    ref = snapshot(settings, tmp_path, {"main.py": "print(1)"})
    produce(settings, [request("r1", "flaky", ref=ref)])
    stats = JudgeWorker(settings, grader(stub, timeout_s=4.0), JudgeConfig(concurrency=6, idle_s=0.2)).run(until_idle=True)
    res = {r.payload.request_id: r.payload for r in read_results(settings)}
    ok = res["req-r1"]
    assert ok.valid and ok.n_invalid_leaves == 2 and ok.score == pytest.approx(4 / 6)
    assert {ls.id[0]: ls.valid for ls in ok.leaf_scores} == {"a": True, "b": True, "c": True, "d": True,
                                                           "e": False, "f": False}
    calls = Counter(c.criterion.split()[1] for c in stub.calls)  # "criterion <id> ..."
    assert calls["a"] == 3 and calls["b"] == 3 and calls["c"] == 2 and calls["d"] == 3 and calls["e"] == 1
    assert stats.invalid_leaves == 2 and stats.invalid_results == 0
    # the endpoint kept failing one leaf after its retries: the worker stops with the error, and emits no
    # result (no invalid zeros); the request is read again by the next run
    produce(settings, [request("r2", "down", ref=ref)])
    with pytest.raises(EndpointError, match="gave up after 3 attempts"):
        JudgeWorker(settings, grader(stub, timeout_s=4.0), JudgeConfig(concurrency=6, idle_s=0.2)).run(until_idle=True)
    assert "req-r2" not in {r.payload.request_id for r in read_results(settings)}
    assert Counter(c.criterion.split()[1] for c in stub.calls)["h"] == 3
    assert set(stub.auth_headers) == {"Bearer sk-judge-secret"}
    assert "retry 1" in caplog.text and "sk-judge-secret" not in caplog.text  # errors logged, the key never


def test_endpoint_refusal_stops_the_worker_and_loses_nothing(settings, stub, tmp_path):
    make_task(tmp_path, "t", rubric=parent("root", [leaf("a [score=1]"), leaf("b [score=1]")]))
    import_tasks(settings, [tmp_path / "t"], "train")
    ref = snapshot(settings, tmp_path, {"x.py": ""})
    produce(settings, [request(f"r{i}", "t", ref=ref) for i in range(4)])
    stub.status_for_all = 401
    with pytest.raises(EndpointConfigError, match="refused model 'stub-judge'"):
        JudgeWorker(settings, grader(stub), JudgeConfig(concurrency=2)).run(until_idle=True)
    assert read_results(settings) == []
    stub.status_for_all = None
    stats = JudgeWorker(settings, grader(stub), JudgeConfig(concurrency=2, idle_s=0.2)).run(until_idle=True)
    assert stats.results == 4 and {r.payload.score for r in read_results(settings)} == {1.0}
    assert all(h == "Bearer EMPTY" for h in stub.auth_headers)  # no key set: a placeholder, never a real one


# ---- priority ------------------------------------------------------------------------------------------


def test_eval_requests_jump_a_train_backlog(settings, tmp_path):
    """3,000 train requests queued; eval requests arrive one by one while the worker is busy. No train request
    starts after an eval request is in Kafka and before that eval request starts; eval p95 wait < one train
    grading time."""
    train_tree = parent("root", [leaf(f"t{i} [score=1]") for i in range(16)])
    eval_tree = parent("root", [leaf(f"e{i} [score=1]") for i in range(4)])
    make_task(tmp_path, "train-task", rubric=train_tree)
    make_task(tmp_path, "eval-task", rubric=eval_tree)
    import_tasks(settings, [tmp_path / "train-task"], "train")
    import_tasks(settings, [tmp_path / "eval-task"], "eval")
    ref = snapshot(settings, tmp_path, {"main.py": "print(1)"})
    produce(settings, [request(f"t{i}", "train-task", ref=ref) for i in range(3000)])
    with StubModel(latency=0.05) as stub:
        worker = JudgeWorker(settings, grader(stub), JudgeConfig(concurrency=4))
        stop = threading.Event()
        th = threading.Thread(target=worker.run, kwargs={"should_stop": stop.is_set})
        th.start()
        try:
            wait_for("3 results", lambda: worker.stats.results >= 3, poll_s=0.05)  # busy grading train requests
            acked = {}
            rng = np.random.default_rng(0)
            for i in range(15):
                time.sleep(float(rng.uniform(0.1, 0.3)))
                ev = request(f"e{i}", "eval-task", "eval", ref=ref)
                produce(settings, [ev])
                acked[ev.payload.request_id] = (ev.produced_at.timestamp(), time.time())
            wait_for("15 eval results", lambda: len(worker.stats.latencies["eval"]) == 15, poll_s=0.05)
        finally:
            stop.set()
            th.join(timeout=60)
    starts = list(worker.sched.starts)
    started = {rid: t for t, _, _, rid in starts}
    # (started, decided): a train start is decided when it asks Kafka whether an eval request waits
    train_starts = [(t, d) for t, d, prio, _ in starts if prio == "train"]
    assert max(t - d for t, d in train_starts) < 2.5  # decided and started close together (5x a loaded machine)
    waits = []
    for rid, (produced, ack) in acked.items():
        s = started[rid]
        waits.append(s - produced)
        overtaking = [t for t, d in train_starts if d > ack + 0.001 and t < s]
        assert not overtaking, f"{len(overtaking)} train requests started while {rid} waited"
    train_time = float(np.median(worker.stats.latencies["train"]))
    p95 = float(np.percentile(waits, 95))
    # behind the backlog an eval request would wait ~2,000 train gradings; jumping it, about one. The bound
    # leaves a loaded CI machine 20x (the ordering above is the exact check; bench/judge.py measures the wait)
    assert p95 < 20 * train_time, (p95, train_time)
    assert worker.stats.results < 3000 - 2000  # thousands were still queued throughout


# ---- kill -9 ---------------------------------------------------------------------------------------------


def judge_cmd(settings, stub, *extra):
    return [sys.executable, "-m", "klong", "judge", "run", "--base-url", stub.url, "--model", "stub-judge",
            "--home", str(settings.home), "--bootstrap-servers", settings.bootstrap_servers,
            "--topic-prefix", settings.topics.prefix, "-q", *extra]


def test_kill_minus_nine_mid_flight_then_restart_gives_one_result_per_request(settings, tmp_path):
    make_task(tmp_path, "t", rubric=parent("root", [leaf(f"c{i} [score={i % 2}]") for i in range(4)]))
    import_tasks(settings, [tmp_path / "t"], "train")
    ref = snapshot(settings, tmp_path, {"main.py": "print(1)"})
    n = 24
    produce(settings, [request(f"r{i}", "t", "eval" if i % 5 == 0 else "train", ref=ref) for i in range(n)])
    with StubModel(latency=0.06) as stub:
        for kill_after in (4, 12):  # two crashes at different points
            proc = subprocess.Popen(judge_cmd(settings, stub, "--concurrency", "4"), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
            try:
                wait_for(f"{kill_after} results", lambda: len({r.payload.request_id for r in read_results(settings)})
                         >= kill_after or proc.poll() is not None, timeout_s=300, poll_s=0.02)  # a CLI start under load
            finally:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
            assert proc.returncode == -signal.SIGKILL
        done = subprocess.run(judge_cmd(settings, stub, "--concurrency", "4", "--until-idle", "--idle", "0.5"),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    results = read_results(settings)
    per_request = Counter()
    for rid, eids in _group(results).items():
        per_request[rid] = len(eids)
    assert set(per_request) == {f"req-r{i}" for i in range(n)}
    assert set(per_request.values()) == {1}, {k: v for k, v in per_request.items() if v != 1}
    assert all(r.payload.score == pytest.approx(0.5) and r.payload.valid for r in results)
    Sink(settings).run(until_idle=True)
    q = Catalog(settings).sql("SELECT status, n_results, count(*) AS n FROM judge_queue GROUP BY ALL").to_dicts()
    assert q == [{"status": "judged", "n_results": 1, "n": n}]


def _group(results):
    out: dict[str, set] = {}
    for r in results:
        out.setdefault(r.payload.request_id, set()).add(r.event_id)
    return out


def test_ledger_resends_a_result_caught_between_wal_and_outbox(tmp_path):
    ledger = Ledger(tmp_path / "judge")
    ev = build_result(_job(), "m")

    def crash(_):
        raise KeyboardInterrupt  # the process dies inside outbox.put

    with pytest.raises(KeyboardInterrupt):
        ledger.record(ev, crash)
    assert "req" not in Ledger(tmp_path / "judge")
    sent = []
    again = Ledger(tmp_path / "judge")
    assert again.recover(sent.append) == 1 and [e.event_id for e in sent] == [ev.event_id]
    assert "req" in again and "req" in Ledger(tmp_path / "judge") and again.recover(sent.append) == 0


# ---- pieces --------------------------------------------------------------------------------------------


class _Ctx:
    def __init__(self, rubric):
        self.task = type("Task", (), {"rubric": rubric})()


def _job(grades=None):
    job = Job(1, "train", "req", "r", JudgeRequestedPayload(request_id="req", step_idx=1, task_id="t", priority="train"),
              time.time())
    job.leaves = [{"id": "a"}, {"id": "b"}]
    job.context = _Ctx(parent("root", [leaf("a"), leaf("b", weight=3)]))
    job.started_at = time.time()
    job.grades = grades or {"a": LeafGrade("a", 1.0, True, "yes"), "b": LeafGrade("b", 0.0, True, "no")}
    return job


def test_build_result_aggregates_and_fits_big_trees():
    r = build_result(_job(), "m").payload
    assert r.score == pytest.approx(0.25) and r.valid and r.n_invalid_leaves == 0
    n = 2000  # PaperBench's largest tree has 1,963 leaves
    job = _job({f"l{i}": LeafGrade(f"l{i}", float(i % 2), True, "ü" * 3000) for i in range(n)})
    job.leaves = [{"id": f"l{i}"} for i in range(n)]
    job.context.task.rubric = parent("root", [leaf(f"l{i}") for i in range(n)])
    ev = build_result(job, "m")
    assert len(encode(ev)) <= MAX_EVENT_BYTES
    assert ev.payload.score == pytest.approx(aggregate(job.context.task.rubric, {f"l{i}": i % 2 for i in range(n)}))
    assert all(ls.explanation.endswith("…") and len(ls.explanation) > 50 for ls in ev.payload.leaf_scores)


def test_scheduler_eval_first_at_leaf_granularity_and_gate():
    waiting = {"eval": False}
    s = Scheduler(gate=lambda: waiting["eval"])

    def job(prio, rid):
        return Job(0, prio, rid, "r", None, time.time())

    t1, t2, e1 = job("train", "t1"), job("train", "t2"), job("eval", "e1")
    s.add(t1)
    s.add(t2)
    assert s.next(0.1) == ("start", t1)
    s.prepared(t1, [{"id": "x"}, {"id": "y"}])
    assert s.next(0.1)[:2] == ("leaf", t1)
    s.add(e1)  # arrives while t1 has a leaf left
    assert s.next(0.1) == ("start", e1)  # the eval request starts before t1's next leaf
    s.prepared(e1, [{"id": "z"}])
    assert s.next(0.1)[:2] == ("leaf", e1)
    assert s.next(0.1)[:2] == ("leaf", t1)  # then train work resumes
    waiting["eval"] = True  # an eval request is in Kafka, not yet read: no train request starts
    assert s.next(0.1) is None
    waiting["eval"] = False
    assert s.next(0.1) == ("start", t2)
    assert not s.add(job("train", "t2"))  # the same request_id again joins the job in flight
    s.drain()
    s.add(job("train", "t3"))
    assert s.next(0.05) is None  # draining: nothing new starts


def test_submission_sources_and_file_selection(settings, tmp_path):
    sub_dir = settings.home / "subs" / "r1"
    (sub_dir / "src").mkdir(parents=True)
    (sub_dir / "src" / "model.py").write_text("class Transformer:\n    attention = 'multi-head'\n")
    (sub_dir / "reproduce.log").write_text("final accuracy 0.91")
    (sub_dir / "weights.bin").write_bytes(b"\0\1\2" * 100)
    (sub_dir / ".git").mkdir()
    (sub_dir / ".git" / "HEAD").write_text("ref")
    by_dir = load_submission(settings, "subs/r1")
    assert set(by_dir.files) == {"src/model.py", "reproduce.log"} and by_dir.skipped == ("weights.bin",)
    blob = load_submission(settings, store_snapshot(settings, sub_dir))
    assert blob.files == by_dir.files
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(sub_dir / "src" / "model.py", arcname="./src/model.py")
    (settings.home / "subs" / "r2.tar.gz").write_bytes(buf.getvalue())
    assert set(load_submission(settings, str(settings.home / "subs" / "r2.tar.gz")).files) == {"src/model.py"}
    with pytest.raises(SubmissionError, match="outside the data home"):
        load_submission(settings, str(tmp_path))
    with pytest.raises(SubmissionError, match="not found"):
        load_submission(settings, "subs/none")
    assert store_snapshot(settings, sub_dir) == store_snapshot(settings, sub_dir)  # content-addressed
    execution = relevant_files(by_dir, {"requirements": "The model was trained", "task_category": "Code Execution"},
                               10_000, 5_000)
    assert execution[0][0] == "reproduce.log"
    dev = relevant_files(by_dir, {"requirements": "Multi-head attention is implemented in the Transformer",
                                  "task_category": "Code Development"}, 10_000, 5_000)
    assert dev[0][0] == "src/model.py"
    assert [p for p, _ in relevant_files(by_dir, {"requirements": "x"}, 10, 5)] == ["reproduce.log"]


@pytest.mark.parametrize("text,score", [
    ('{"explanation": "done", "score": 1}', 1),
    ('```json\n{"explanation": "no", "score": 0}\n```', 0),
    ('Looking at train.py... {"score": "1", "explanation": "ok"} that is all', 1),
    ('{"score": true}', 1), ('{"score": 1.0}', 1),
    ("The criterion is met.\nScore: 0", 0),
    ('{"score": 0.5}', None), ('{"score": 2}', None), ("I think it is fine.", None), ("", None),
    ('{"explanation": "forgot the score"}', None), ("score: 10", None),
])
def test_parse_verdict(text, score):
    assert parse_verdict(text)[0] == score


def test_cli_request_and_run(settings, stub, tmp_path, capsys):
    make_task(tmp_path, "cli-t", rubric=parent("root", [leaf("a [score=1]"), leaf("b [score=0]")]))
    import_tasks(settings, [tmp_path / "cli-t"], "eval")
    sub = tmp_path / "submission"
    sub.mkdir()
    (sub / "main.py").write_text("print('hello')")
    from tests.helpers import rollout_events

    produce(settings, rollout_events("r-cli", 8, task_id="cli-t", score=None))  # the request is checked against it
    Sink(settings).run(until_idle=True)
    assert main(klong(settings, "judge", "request", "--rollout", "r-cli", "--task", "cli-t", "--step", "7",
                      "--priority", "eval", "--snapshot", str(sub), "--request-id", "cli-req")) == 0
    assert capsys.readouterr().out.strip() == "cli-req"
    assert main(klong(settings, "judge", "run", "--base-url", stub.url, "--model", "stub-judge", "--until-idle",
                      "--idle", "0.2", "--concurrency", "2")) == 0
    assert "judge: 1 results (0 invalid), 2 leaves graded (0 invalid)" in capsys.readouterr().out
    Sink(settings).run(until_idle=True)
    assert main(klong(settings, "sql", "SELECT request_id, rollout_id, step_idx, score, valid FROM judge_results",
                      "--format", "json")) == 0
    assert json.loads(capsys.readouterr().out) == [{"request_id": "cli-req", "rollout_id": "r-cli", "step_idx": 7,
                                                    "score": 0.5, "valid": True}]
    assert main(klong(settings, "judge", "run", "--until-idle")) == 2  # no URL / model
    assert "--base-url and --model are required" in capsys.readouterr().err


def test_request_judgment_goes_to_the_priority_topic(settings):
    with Outbox(settings, settings.outbox_dir / "p", retain="acked") as ob:
        rid = request_judgment(ob, rollout_id="r", task_id="t", step_idx=4, priority="eval")
        request_judgment(ob, rollout_id="r", task_id="t", step_idx=5)
        ob.flush(until="acked")
    consumer = KafkaConsumer(**settings.kafka_config(), group_id=None)
    try:
        counts = {}
        for topic in (settings.topics.judge_eval, settings.topics.judge_train):
            tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
            counts[topic] = sum(consumer.end_offsets(tps).values())
    finally:
        consumer.close()
    assert counts == {settings.topics.judge_eval: 1, settings.topics.judge_train: 1}
    assert len(rid) == 36


def test_simulate_with_judge_url_uses_the_real_judge_path(settings, stub, capsys):
    from consumers.sink import Sink
    from store.catalog import Catalog

    assert main(klong(settings, "simulate", "--rollouts", "2", "--min-turns", "50", "--max-turns", "60", "-q",
                      "--judge-url", stub.url, "--judge-model", "stub-judge")) == 0
    assert "judged" in capsys.readouterr().out
    assert stub.calls, "no leaf was graded by the endpoint"
    Sink(settings).run(until_idle=True)
    results = Catalog(settings).sql("SELECT r.judge_model, r.valid, q.request_id IS NOT NULL AS requested "
                                    "FROM judge_results r LEFT JOIN judge_requests q USING (request_id)")
    assert results.height >= 2  # a snapshot every ~50 turns and at the end, per rollout
    assert set(results["judge_model"]) == {"stub-judge"} and all(results["requested"])
