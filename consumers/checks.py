"""Command-graded rubric leaves: a leaf with `"check": "SHELL COMMAND"` is graded by running the command on
the submission; exit 0 scores 1, anything else (a non-zero exit, the timeout) scores 0. Exact and cheap,
for tasks whose success a program can tell (a file written, a test passing); leaves without `check` still
go to the judge model (consumers.grading), and one tree may mix both.

    grade = grade_check(submission, {"id": "hello", "check": "grep -qx hello hello.txt", ...})
    # LeafGrade(leaf_id="hello", score=1.0, valid=True, explanation="exit 0: ...")

How: the submission's files (the snapshot the judge loaded: text files, as `load_submission` reads them)
are written to a scratch directory and the command runs there, as its working directory, in the isolated
sandbox (`producers.sandbox_local.run_in_sandbox`: own namespaces, no network, no data home; writes are
thrown away) with a wall-time limit of `CHECK_TIMEOUT_S` (a leaf's `check_timeout` overrides it). Where the
machine cannot isolate (no bubblewrap or user namespaces) grading stops with an error saying why, like the
runner: a check runs the agent's files, and only `KLONG_CHECKS_SANDBOX=unsafe-local` lets it run them
unisolated (the subprocess sandbox over the scratch copy, with rlimits; the explanation says so).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from consumers.grading import LeafGrade, Submission
from schemas.errors import TerminalError

log = logging.getLogger("klong.judge")

CHECK_TIMEOUT_S = 60.0
MAX_EXPLANATION = 1500


def has_check(leaf: dict) -> bool:
    return isinstance(leaf.get("check"), str) and bool(leaf["check"].strip())


def write_submission(sub: Submission, directory: Path) -> Path:
    """The submission's files under `directory` (paths kept; nothing outside it)."""
    root = directory.resolve()
    for name, text in sub.files.items():
        path = (root / name).resolve()
        if root not in path.parents:  # a tar member like ../x: never written outside the scratch copy
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def run_command(directory: Path, command: str, timeout_s: float):
    """(ExecResult, how): the command over `directory` in the isolated sandbox, or the subprocess one."""
    try:
        from producers.sandbox_local import isolation_problem, run_in_sandbox
        problem = isolation_problem()
    except ImportError:  # an older checkout without the isolated sandbox
        problem = "the isolated sandbox is not available"
    if problem is None:
        return run_in_sandbox(directory, command, timeout_s=timeout_s), "sandbox"
    if os.environ.get("KLONG_CHECKS_SANDBOX") != "unsafe-local":
        raise TerminalError(f"rubric checks cannot run isolated on this machine: {problem}; they run the agent's "
                            "files, so set KLONG_CHECKS_SANDBOX=unsafe-local only to run them unisolated anyway")
    from producers.sandbox import SubprocessSandbox

    sb = SubprocessSandbox(directory.parent)
    sb.submission_dir = str(directory)
    try:
        return sb.run(command, timeout_s=timeout_s), f"subprocess ({problem})"
    finally:
        sb.close()


def grade_check(sub: Submission, leaf: dict) -> LeafGrade:
    """Runs the leaf's check on the submission: a valid 0/1 (a failing or timed-out command scores 0)."""
    timeout = float(leaf.get("check_timeout") or CHECK_TIMEOUT_S)
    with tempfile.TemporaryDirectory(prefix="klong-check-") as tmp:
        root = write_submission(sub, Path(tmp) / "submission")
        root.mkdir(exist_ok=True)
        res, how = run_command(root, leaf["check"], timeout)
    ok = res.exit_code == 0 and not res.timed_out
    status = f"timed out after {timeout:g}s" if res.timed_out else f"exit {res.exit_code}"
    tail = res.output[-MAX_EXPLANATION:].strip()
    return LeafGrade(leaf["id"], 1.0 if ok else 0.0, True,
                     f"check `{leaf['check']}` {status} in the {how}" + (f": {tail}" if tail else ""))


CHECKS_MODEL = "checks"  # the judge_model of results graded with no judge model (`judge: checks` in a plan)


class ChecksOnlyClient:
    """Stands where the judge model's client would for rubrics whose leaves all have `check` commands:
    a leaf without one is invalid (score 0, counted) with a message saying why, never a network call."""

    def __init__(self):
        from consumers.grading import GraderConfig

        self.cfg = GraderConfig(base_url="", model=CHECKS_MODEL)

    def complete(self, messages):
        from consumers.grading import EndpointError

        raise EndpointError("no judge model configured (judge: checks) and this leaf has no `check` command")

    def close(self) -> None:
        pass
