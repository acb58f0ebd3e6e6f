"""The viewer's pure logic, table-driven: rubric trees with leaves not graded, search snippets, id links."""

from __future__ import annotations

import pytest

from ui.app import group_url, rollout_url
from ui.finder import _snippet
from ui.viewer import rubric_tree

# root (w1) -> section A (w3) -> leaves a1 (w2), a2 (w1); leaf b (w1)
NODES = [
    {"node_id": "root", "weight": 1, "is_leaf": False, "requirements": "all", "task_category": None, "path": "$"},
    {"node_id": "A", "weight": 3, "is_leaf": False, "requirements": "A", "task_category": None, "path": "$.sub_tasks[0]"},
    {"node_id": "a1", "weight": 2, "is_leaf": True, "requirements": "a1", "task_category": "x", "path": "$.sub_tasks[0].sub_tasks[0]"},
    {"node_id": "a2", "weight": 1, "is_leaf": True, "requirements": "a2", "task_category": "x", "path": "$.sub_tasks[0].sub_tasks[1]"},
    {"node_id": "b", "weight": 1, "is_leaf": True, "requirements": "b", "task_category": "x", "path": "$.sub_tasks[1]"},
]


def grade(score, valid=True):
    return {"score": score, "valid": valid, "explanation": "why"}


@pytest.mark.parametrize("leaves, judge, root, a, mismatch", [
    ({"a1": grade(1), "a2": grade(0), "b": grade(1)}, 0.75, 0.75, 2 / 3, False),  # all graded: the judge's mean
    ({"a1": grade(1), "a2": grade(1)}, 1.0, 1.0, 1.0, False),  # b not graded: left out, not a 0
    ({"a1": grade(1), "a2": grade(None, valid=False), "b": grade(0)}, 0.5, 0.5, 2 / 3, False),  # invalid counts 0
    ({}, 0.104, 0.104, None, True),  # nothing graded: the root is still the judge's, flagged
    ({"a1": grade(1), "a2": grade(0), "b": grade(1)}, 0.2, 0.2, 2 / 3, True),  # the tree cannot give the judge's Q
])
def test_rubric_tree_not_graded_is_not_zero(leaves, judge, root, a, mismatch):
    t = rubric_tree(NODES, leaves, judge)
    assert t["score"] == pytest.approx(root) and t["mismatch"] is mismatch
    sec, b = t["children"]
    assert (sec["score"] is None) if a is None else sec["score"] == pytest.approx(a)
    assert b["graded"] is ("b" in leaves) and (b["score"] is None) is ("b" not in leaves)


def test_rubric_tree_of_a_deep_rubric_needs_no_recursion():
    nodes = [{"node_id": "n0", "weight": 1, "is_leaf": False, "requirements": "r", "task_category": None, "path": "$"}]
    path = "$"
    for i in range(1, 3000):
        path += ".sub_tasks[0]"
        nodes.append({"node_id": f"n{i}", "weight": 1, "is_leaf": i == 2999, "requirements": "r",
                      "task_category": None, "path": path})
    assert rubric_tree(nodes, {"n2999": grade(1)})["score"] == 1.0


def test_snippet_marks_the_first_match_any_case():
    row = _snippet({"txt": "x" * 300 + "Needle here" + "y" * 300, "w0": 0, "n_chars": 611}, "needle")
    assert row["match"] == "Needle" and row["before"].startswith("…") and row["after"].endswith("…")
    assert "txt" not in row and len(row["before"]) == 101
    whole = _snippet({"txt": "a needle", "w0": 0, "n_chars": 8}, "NEEDLE")
    assert (whole["before"], whole["match"], whole["after"]) == ("a ", "needle", "")
    window = _snippet({"txt": "b needle c", "w0": 50, "n_chars": 80}, "needle")  # a window cut from a longer text
    assert (window["before"], window["after"]) == ("…b ", " c…")


@pytest.mark.parametrize("rid, url", [
    ("plain", "/rollouts/plain"), ("a/b", "/rollouts/a%2Fb"), ("../sql?q=1", "/rollouts/..%2Fsql%3Fq%3D1"),
    ("..", "/rollout?id=.."), (".", "/rollout?id=."), ("x#y", "/rollouts/x%23y"), ("é z", "/rollouts/%C3%A9%20z"),
])
def test_id_links_are_encoded(rid, url):
    assert rollout_url(rid) == url and group_url(rid) == url.replace("/rollouts/", "/groups/").replace("/rollout?", "/group?")


def test_token_texts_of_ids_a_tokenizer_does_not_know_are_none():
    from ui.tokens import _texts

    assert _texts([104, 20216, 105], "bytes") == ["h", None, "i"]  # 20216: not a byte
    assert _texts([1, 2], None) == [None, None]
