"""PaperBench rubric trees: validation with every violation named by its JSON path, and aggregation.

    report = validate_rubric(json.load(open("rubric.json")))   # RubricReport(errors, warnings, ...)
    check_rubric(tree, where="papers/fre/rubric.json")          # raises RubricError listing every violation
    q = aggregate(tree, {"leaf-a": 1.0, "leaf-b": 0.0})          # root score Q in [0, 1]

Rules (PaperBench's `TaskNode`): every node is an object with `id` (non-empty string), `requirements`
(non-empty string), `weight` (a number >= 0, not a bool) and `sub_tasks` (a list); a leaf (no
sub_tasks) has a `task_category` in {Code Development, Code Execution, Result Analysis}; a parent has
no `task_category` (null or absent) and no `finegrained_task_category`; a `finegrained_task_category`,
where given, is one of PaperBench's seven; ids are unique.

What the 23 real PaperBench rubrics (12,038 nodes) do, checked by tests/test_rubric.py: every node has
exactly those six keys; every leaf has one of the three categories and a fine-grained one; every
parent has null for both; weights are integers >= 1. Two trees break "unique ids": `bbox` repeats 3
leaf ids and `bridging-data-gaps` 3, each a byte-identical copy of the same leaf (the same criterion
listed under two parents). So a duplicate id whose subtree is identical to the first is a *warning*:
the criterion is graded once and its score counts at each position; a duplicate id with different
content is an error (`strict_ids=True` makes every duplicate an error). Unknown extra keys are
warnings (kept, ignored by the judge).

Aggregation (PaperBench's judge): a leaf scores 0 or 1, a parent is the weighted mean of its
children, children whose weights sum to 0 give 0, the root is Q.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional

from schemas.errors import ValidationError

TASK_CATEGORIES = ("Code Development", "Code Execution", "Result Analysis")
FINEGRAINED_CATEGORIES = (
    "Environment & Infrastructure Setup", "Dataset and Model Acquisition", "Data Processing & Preparation",
    "Method Implementation", "Experimental Setup", "Evaluation, Metrics & Benchmarking",
    "Logging, Analysis & Presentation",
)
REQUIRED_KEYS = ("id", "requirements", "weight", "sub_tasks")
# `check` (ours, optional, leaves only): a shell command run on the submission; exit 0 scores the leaf 1
# (consumers.checks), no judge model asked. Leaves without it go to the judge model.
KNOWN_KEYS = frozenset(REQUIRED_KEYS + ("task_category", "finegrained_task_category", "check"))


@dataclass(frozen=True)
class Violation:
    path: str  # JSON path of the node or field at fault: $.sub_tasks[2].weight
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass(frozen=True)
class RubricReport:
    errors: list[Violation] = field(default_factory=list)
    warnings: list[Violation] = field(default_factory=list)
    n_nodes: int = 0
    n_leaves: int = 0  # leaf positions (a leaf repeated under two parents counts twice)
    depth: int = 0  # root = 0

    @property
    def ok(self) -> bool:
        return not self.errors


class RubricError(ValidationError):
    """A rubric tree breaks the rules. `violations` lists every one with its JSON path."""

    def __init__(self, where: str, violations: list[Violation]):
        self.where, self.violations = where, violations
        shown = "\n".join(f"  {v}" for v in violations[:50])
        more = f"\n  ... and {len(violations) - 50} more" if len(violations) > 50 else ""
        super().__init__(f"{where}: {len(violations)} rubric violation(s), nothing imported:\n{shown}{more}")


@dataclass(frozen=True)
class Node:
    """One position in a (validated) tree, as `walk` yields it."""

    path: str
    node: dict
    parent_id: Optional[str]
    depth: int

    @property
    def id(self) -> str:
        return self.node["id"]

    @property
    def is_leaf(self) -> bool:
        return not self.node.get("sub_tasks")


def walk(tree: Any) -> Iterator[Node]:
    """Every object node of the tree, depth first in document order (iterative: no recursion limit)."""
    stack = [Node("$", tree, None, 0)] if isinstance(tree, dict) else []
    while stack:
        n = stack.pop()
        yield n
        subs = n.node.get("sub_tasks")
        if isinstance(subs, list):
            pid = n.node.get("id") if isinstance(n.node.get("id"), str) else None
            for i in range(len(subs) - 1, -1, -1):
                if isinstance(subs[i], dict):
                    stack.append(Node(f"{n.path}.sub_tasks[{i}]", subs[i], pid, n.depth + 1))


def _canonical(node: Any) -> str:
    return json.dumps(node, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_node(path: str, node: dict, errors: list[Violation], warnings: list[Violation]) -> None:
    for key in REQUIRED_KEYS:
        if key not in node:
            errors.append(Violation(path, f"missing required key {key!r}"))
    if "id" in node and not (isinstance(node["id"], str) and node["id"].strip()):
        errors.append(Violation(f"{path}.id", f"must be a non-empty string, got {node['id']!r}"))
    if "requirements" in node and not (isinstance(node["requirements"], str) and node["requirements"].strip()):
        errors.append(Violation(f"{path}.requirements", "must be a non-empty string"))
    if "weight" in node:
        w = node["weight"]
        if not _is_number(w) or not math.isfinite(w):
            errors.append(Violation(f"{path}.weight", f"must be a number, got {w!r}"))
        elif w < 0:
            errors.append(Violation(f"{path}.weight", f"must be >= 0, got {w}"))
    subs = node.get("sub_tasks")
    if "sub_tasks" in node and not isinstance(subs, list):
        errors.append(Violation(f"{path}.sub_tasks", f"must be a list, got {type(subs).__name__}"))
    elif isinstance(subs, list):
        for i, child in enumerate(subs):
            if not isinstance(child, dict):
                errors.append(Violation(f"{path}.sub_tasks[{i}]", f"must be an object, got {type(child).__name__}"))
    cat, fine = node.get("task_category"), node.get("finegrained_task_category")
    if "sub_tasks" in node and not isinstance(subs, list):
        pass  # neither leaf nor parent: its categories cannot be judged
    elif subs:  # a parent
        if cat is not None:
            errors.append(Violation(f"{path}.task_category", f"a parent node has no task_category, got {cat!r}"))
        if fine is not None:
            errors.append(Violation(f"{path}.finegrained_task_category",
                                    f"a parent node has no finegrained_task_category, got {fine!r}"))
    else:  # a leaf (sub_tasks empty, or missing: reported above, still checked as a leaf)
        if cat not in TASK_CATEGORIES:
            what = "missing" if cat is None else repr(cat)
            errors.append(Violation(f"{path}.task_category",
                                    f"a leaf needs a task_category in {list(TASK_CATEGORIES)}, got {what}"))
        if fine is not None and fine not in FINEGRAINED_CATEGORIES:
            errors.append(Violation(f"{path}.finegrained_task_category",
                                    f"must be one of {list(FINEGRAINED_CATEGORIES)} or null, got {fine!r}"))
    check = node.get("check")
    if check is not None and (subs or not isinstance(check, str) or not check.strip()):
        errors.append(Violation(f"{path}.check", "a parent node has no check" if subs else
                                f"must be a non-empty shell command string, got {check!r}"))
    extra = sorted(set(node) - KNOWN_KEYS)
    if extra:
        warnings.append(Violation(path, f"unknown keys {extra} (kept, ignored)"))


def validate_rubric(tree: Any, *, strict_ids: bool = False) -> RubricReport:
    """Checks every rule on every node; never stops at the first violation."""
    if not isinstance(tree, dict):
        return RubricReport(errors=[Violation("$", f"the rubric must be a JSON object, got {type(tree).__name__}")])
    errors: list[Violation] = []
    warnings: list[Violation] = []
    first: dict[str, tuple[str, dict]] = {}  # id -> (path, node) of its first occurrence
    n_nodes = n_leaves = depth = 0
    for n in walk(tree):
        n_nodes += 1
        depth = max(depth, n.depth)
        n_leaves += isinstance(n.node.get("sub_tasks"), list) and not n.node["sub_tasks"]
        _check_node(n.path, n.node, errors, warnings)
        nid = n.node.get("id")
        if not isinstance(nid, str):
            continue
        if nid not in first:
            first[nid] = (n.path, n.node)
            continue
        where, node = first[nid]
        same = _canonical(n.node) == _canonical(node)  # only for repeats: real trees have a handful
        if same and not strict_ids:
            warnings.append(Violation(f"{n.path}.id", f"id {nid!r} repeats {where} with identical content "
                                      "(graded once, counted at both positions)"))
        else:
            errors.append(Violation(f"{n.path}.id", f"duplicate id {nid!r} (first at {where}, "
                                    f"{'identical' if same else 'different'} content)"))
    return RubricReport(errors, warnings, n_nodes, n_leaves, depth)


def check_rubric(tree: Any, *, where: str = "rubric", strict_ids: bool = False) -> RubricReport:
    """`validate_rubric`, raising RubricError with every violation when there is any."""
    report = validate_rubric(tree, strict_ids=strict_ids)
    if report.errors:
        raise RubricError(where, report.errors)
    return report


def leaves(tree: dict) -> list[dict]:
    """The distinct leaves of a valid tree (by id, first occurrence, document order): what gets graded."""
    seen: dict[str, dict] = {}
    for n in walk(tree):
        if n.is_leaf and n.id not in seen:
            seen[n.id] = n.node
    return list(seen.values())


def aggregate(tree: dict, leaf_scores: Mapping[str, float]) -> float:
    """Root score Q of a valid tree. A leaf missing from `leaf_scores` scores 0.

    A parent is the weighted mean of its children; children whose weights sum to 0 give 0.
    Computed bottom-up without recursion (real trees are shallow, hostile ones need not be).
    """
    return node_scores(tree, leaf_scores)["$"]


def node_scores(tree: dict, leaf_scores: Mapping[str, float]) -> dict[str, float]:
    """Score of every node, keyed by JSON path (ids can repeat, paths cannot)."""
    nodes = list(walk(tree))
    score: dict[str, float] = {}
    for n in reversed(nodes):  # children come after their parent in walk order
        subs = n.node.get("sub_tasks") or []
        if not subs:
            s = float(leaf_scores.get(n.id, 0.0))
            if not 0.0 <= s <= 1.0:
                raise ValueError(f"leaf {n.id!r} score {s} is outside [0, 1]")
            score[n.path] = s
            continue
        total = sum(float(c["weight"]) for c in subs)
        score[n.path] = 0.0 if total <= 0 else sum(
            float(c["weight"]) * score[f"{n.path}.sub_tasks[{i}]"] for i, c in enumerate(subs)) / total
    return score
