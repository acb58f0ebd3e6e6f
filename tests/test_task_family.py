"""The seeded task family: deterministic, graded exactly by its rubric checks (the judge's own check runner),
split train / held out in the registry, and the shipped set is what its seed generates."""

from __future__ import annotations

import filecmp
import subprocess
from pathlib import Path

import pytest

from consumers.checks import grade_check
from consumers.grading import Submission
from klong.cli import main
from producers.task_family import KINDS, generate_family, write_family
from producers.task_source import load_task_dir
from schemas.errors import ConfigError
from store.catalog import Catalog

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "tasks" / "family"


def leaves(node):
    if not node["sub_tasks"]:
        yield node
    for c in node["sub_tasks"]:
        yield from leaves(c)


def grade(task, files: dict) -> list[float]:
    sub = Submission(None, files, ())
    return [grade_check(sub, leaf).score for leaf in leaves(task.rubric)]


def solve(task, tmp_path: Path) -> dict:
    """The reference solution run in an empty directory -> its files (as a snapshot holds them)."""
    d = tmp_path / f"ref-{task.task_id}"
    d.mkdir()
    for cmd in task.solution:
        subprocess.run(["bash", "-c", cmd], cwd=d, check=True)
    return {p.name: p.read_text() for p in d.iterdir()}


@pytest.fixture(autouse=True)
def _checks_anywhere(monkeypatch):
    # Where the machine cannot isolate, the judge refuses checks unless told; these are our own reference files.
    monkeypatch.setenv("KLONG_CHECKS_SANDBOX", "unsafe-local")


def test_deterministic_from_its_seed():
    a, b, c = generate_family(7, 25), generate_family(7, 25), generate_family(8, 25)
    assert a == b
    assert [t.title for t in a] != [t.title for t in c]
    assert {t.kind for t in a} == set(KINDS)
    assert len({t.task_id for t in a}) == 25 and len({t.title for t in a}) == 25
    splits = {(t.kind, t.split) for t in a}
    assert all((k, s) in splits for k in KINDS for s in ("train", "eval"))  # every kind in both splits


def test_every_check_passes_on_the_reference_and_fails_on_an_empty_submission(tmp_path):
    tasks = generate_family(3, 15)  # three of each kind
    for t in tasks:
        assert grade(t, solve(t, tmp_path)) == [1.0] * len(list(leaves(t.rubric))), t.task_id
        assert grade(t, {}) == [0.0] * len(list(leaves(t.rubric))), t.task_id


def test_partial_credit_for_the_right_file_with_the_wrong_content(tmp_path):
    t = next(t for t in generate_family(3, 15) if t.kind == "compute")
    fname = next(leaf["check"].split()[-1] for leaf in leaves(t.rubric) if leaf["id"] == "file-exists")
    assert grade(t, {fname: "not a number\n"}) == [1.0, 1.0, 0.0]
    assert grade(t, {"other.txt": "x\n"}) == [1.0, 0.0, 0.0]


def test_bad_arguments_are_refused():
    with pytest.raises(ConfigError, match="--n"):
        generate_family(0, 0)
    with pytest.raises(ConfigError, match="eval-fraction"):
        generate_family(0, 10, 1.0)
    with pytest.raises(ConfigError, match="unknown task kind 'nope'"):
        generate_family(0, 10, kinds=("nope",))


def test_the_shipped_family_is_what_seed_0_generates(tmp_path):
    write_family(generate_family(0, 50, 0.4), tmp_path / "gen")
    cmp = filecmp.dircmp(SHIPPED, tmp_path / "gen")
    assert sorted(p.name for p in (SHIPPED / "train").iterdir()) == sorted(p.name for p in (tmp_path / "gen/train").iterdir())
    assert sorted(p.name for p in (SHIPPED / "eval").iterdir()) == sorted(p.name for p in (tmp_path / "gen/eval").iterdir())
    assert not cmp.diff_files
    for split in ("train", "eval"):
        for d in (tmp_path / "gen" / split).iterdir():
            assert not filecmp.dircmp(SHIPPED / split / d.name, d).diff_files, d
            src, problems = load_task_dir(SHIPPED / split / d.name, split)
            assert src is not None and not problems and not src.report.errors


def test_generate_cli_registers_both_splits(settings, tmp_path, capsys):
    out = tmp_path / "fam"
    args = ["--home", str(settings.home), "--bootstrap-servers", settings.bootstrap_servers,
            "--topic-prefix", settings.topics.prefix]
    assert main(["tasks", "generate", "--seed", "5", "--n", "10", "-o", str(out), "--import", *args]) == 0
    assert "wrote 10 tasks (seed 5): 5 train" in capsys.readouterr().out
    from consumers.sink import Sink

    Sink(settings).run(until_idle=True)
    rows = Catalog(settings).arrow("SELECT split, count(*) AS n, list(title) AS titles FROM tasks GROUP BY split "
                                   "ORDER BY split").to_pylist()
    assert [(r["split"], r["n"]) for r in rows] == [("eval", 5), ("train", 5)]
    assert not set(rows[0]["titles"]) & set(rows[1]["titles"])
    assert main(["tasks", "generate", "--seed", "5", "--n", "10", "-o", str(out), *args]) != 0
    assert "is not empty" in capsys.readouterr().err
