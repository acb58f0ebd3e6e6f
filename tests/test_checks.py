"""Command-graded rubric leaves (consumers.checks) and the shipped task set (tasks/): validation, exact
grading in the sandbox, and the real judge worker grading snapshots of the shipped tasks with no model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from consumers.checks import CHECKS_MODEL, ChecksOnlyClient, grade_check
from consumers.grading import GraderConfig, Submission
from consumers.judge import JudgeConfig, JudgeWorker
from consumers.sink import Sink
from producers.judge_requests import request_judgment, store_snapshot
from producers.outbox import Outbox
from producers.tasks import import_tasks
from schemas.rubric import validate_rubric
from store.catalog import Catalog
from tests.test_rubric import leaf, parent

TASKS = Path(__file__).resolve().parents[1] / "tasks"
SHIPPED = sorted(p for p in TASKS.iterdir() if (p / "rubric.json").is_file())


def sub(files: dict) -> Submission:
    return Submission("test", files, ())


def test_check_key_is_validated():
    ok = parent("root", [{**leaf("a"), "check": "true"}, leaf("b")])
    report = validate_rubric(ok)
    assert report.ok and not report.warnings
    bad = parent("root", [{**leaf("a"), "check": ""}, {**leaf("b"), "check": 3}])
    assert [v.path for v in validate_rubric(bad).errors] == ["$.sub_tasks[0].check", "$.sub_tasks[1].check"]
    on_parent = {**parent("root", [leaf("a")]), "check": "true"}
    assert "a parent node has no check" in str(validate_rubric(on_parent).errors[0])


def test_grade_check_exit_code_is_the_score():
    hello = sub({"hello.txt": "hello\n", "src/add.py": "def add(a, b):\n    return a + b\n"})
    assert grade_check(hello, {"id": "x", "check": "grep -qx hello hello.txt"}).score == 1.0
    g = grade_check(hello, {"id": "x", "check": "grep -q bye hello.txt"})
    assert (g.score, g.valid) == (0.0, True) and "exit 1" in g.explanation
    # subfolders kept; python runs in the submission directory
    g = grade_check(hello, {"id": "x", "check": "cd src && python3 -c 'from add import add; assert add(2, 3) == 5'"})
    assert g.score == 1.0, g.explanation
    slow = grade_check(hello, {"id": "x", "check": "sleep 30", "check_timeout": 1})
    assert (slow.score, slow.valid) == (0.0, True) and "timed out" in slow.explanation
    # writes by a check are thrown away and never reach outside the scratch copy
    g = grade_check(hello, {"id": "x", "check": "rm -f hello.txt && test ! -e hello.txt && touch ../escape"})
    assert not Path("../escape").exists()


@pytest.mark.parametrize("task", SHIPPED, ids=lambda p: p.name)
def test_shipped_tasks_are_valid_and_fully_command_graded(task):
    tree = json.loads((task / "rubric.json").read_text())
    report = validate_rubric(tree)
    assert report.ok and not report.warnings, report.errors
    leaves = [n for n in tree["sub_tasks"]]
    assert leaves and all(n["check"] for n in leaves)
    for name in ("config.yaml", "paper.md", "addendum.md", "blacklist.txt"):
        assert (task / name).is_file()


# A correct, a partial and an empty submission of each shipped task -> the exact scores of its rubric.
SOLUTIONS = {
    "hello-file": [({"hello.txt": "hello\n"}, 1.0), ({"hello.txt": "bye\n"}, 0.5), ({"notes.md": "x"}, 0.25)],
    "answer-file": [({"answer.txt": "42\n"}, 1.0), ({"answer.txt": "41"}, 0.5), ({}, 0.0)],
    "fix-add": [({"add.py": "def add(a, b):\n    return a + b\n"}, 1.0),
                ({"add.py": "def add(a, b):\n    return a - b\n"}, 0.5), ({"x.txt": ""}, 0.25)],
}


def test_judge_worker_grades_shipped_tasks_with_checks_only(settings, tmp_path):
    import_tasks(settings, SHIPPED, "train")
    expected = {}
    with Outbox(settings) as outbox:
        for task, cases in SOLUTIONS.items():
            for i, (files, score) in enumerate(cases):
                d = tmp_path / f"{task}-{i}"
                d.mkdir()
                for name, text in files.items():
                    (d / name).write_text(text)
                rid = request_judgment(outbox, rollout_id=f"r-{task}-{i}", task_id=task, step_idx=3,
                                       snapshot_ref=store_snapshot(settings, d))
                expected[rid] = score
        outbox.flush(timeout=60, until="acked")
    client = ChecksOnlyClient()
    stats = JudgeWorker(settings, GraderConfig(base_url="", model=CHECKS_MODEL), JudgeConfig(concurrency=3, idle_s=0.3),
                        client=client).run(until_idle=True)
    assert stats.results == len(expected) and stats.invalid_leaves == 0
    Sink(settings).run(until_idle=True)
    rows = Catalog(settings).sql("SELECT request_id, score, valid FROM judge_results").to_dicts()
    assert {r["request_id"]: r["score"] for r in rows} == pytest.approx(expected)
    assert all(r["valid"] for r in rows)


def test_a_leaf_without_check_under_checks_only_is_invalid_not_fatal():
    from consumers.grading import grade_leaf

    g = grade_leaf(ChecksOnlyClient(), "system", sub({}), leaf("needs a model"))
    assert (g.score, g.valid) == (0.0, False) and "no judge model" in g.explanation


def test_checks_refuse_to_run_unisolated_unless_told(monkeypatch):
    """A machine that cannot isolate (stood in for by the probe's answer) stops grading with the reason;
    KLONG_CHECKS_SANDBOX=unsafe-local runs the check in the rlimited subprocess sandbox and says so."""
    import producers.sandbox_local as sandbox_local
    from schemas.errors import TerminalError

    monkeypatch.setattr(sandbox_local, "isolation_problem", lambda: "bwrap not found")
    hello = sub({"hello.txt": "hello\n"})
    with pytest.raises(TerminalError, match="cannot run isolated on this machine: bwrap not found"):
        grade_check(hello, {"id": "x", "check": "grep -qx hello hello.txt"})
    monkeypatch.setenv("KLONG_CHECKS_SANDBOX", "unsafe-local")
    g = grade_check(hello, {"id": "x", "check": "grep -qx hello hello.txt"})
    assert g.score == 1.0 and "subprocess (bwrap not found)" in g.explanation
