"""A family of small agent tasks generated from a seed, split train / held-out (eval), in PaperBench format.

    tasks = generate_family(seed=0, n=40, eval_fraction=0.3)      # [FamilyTask, ...], the same for the same seed
    write_family(tasks, "tasks/family")                            # tasks/family/{train,eval}/<task_id>/...
    klong tasks generate --seed 0 --n 40 -o tasks/family [--import]   # the same from the command line

Kinds (each a thing a 135M model can sometimes do with one or two tool calls, and learn to do more often):
`write-word` (write a given word into a file), `compute` (compute a sum, difference or product and write
it), `fix-bug` (write a one-line function with its operator bug fixed), `edit-file` (create a config line,
then change its value in place) and `write-lines` (three words, one per line). Names, words, numbers and
operators vary with the seed, so the held-out tasks share the skill, never the answer.

Every task's paper shows the tool call(s) that do it (as the shipped tasks do: a small model copies a
worked call far more often than it invents one) and its rubric grades by `check` commands with partial
credit: any file written (1), the right file (1), the right content (2) (`write-lines`: the first word
(1) and all three (1) instead). `FamilyTask.solution` is the reference: the shell commands of those
calls, which pass every check; an empty submission fails every check.

Splits: `eval_fraction` of each kind's tasks is held out (eval) by a seeded draw (at least one of each
split when n >= 2), and
every title names its values, so no title repeats across splits (the registry's decontamination rule).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from schemas.errors import ConfigError

KINDS = ("write-word", "compute", "fix-bug", "edit-file", "write-lines")
WORDS = ("apple", "maple", "river", "stone", "cloud", "tiger", "lemon", "piano", "ocean", "candle", "forest",
         "silver", "garden", "rocket", "pepper", "winter", "yellow", "falcon", "marble", "violet", "copper",
         "meadow", "harbor", "thunder")
FILES = ("notes", "answer", "result", "output", "value", "record", "memo", "data", "entry", "log")
FUNCS = ("combine", "merge", "apply", "calc", "mix", "join_nums", "operate", "pair")
KEYS = ("mode", "level", "color", "size", "speed", "name", "limit", "theme")
OPS = {"+": ("adds", "plus", "-"), "-": ("subtracts b from", "minus", "+"), "*": ("multiplies", "times", "+")}


@dataclass(frozen=True)
class FamilyTask:
    """One generated task: its folder's files, its split and its reference solution."""

    task_id: str
    kind: str
    split: str
    title: str
    paper_md: str
    addendum: str
    rubric: dict
    solution: tuple[str, ...]  # shell commands run in the submission directory, in order

    def files(self) -> dict[str, str]:
        return {"config.yaml": f"id: {self.task_id}\ntitle: {json.dumps(self.title)}\nkind: {self.kind}\n",
                "paper.md": self.paper_md, "addendum.md": self.addendum + "\n", "blacklist.txt": "none\n",
                "rubric.json": json.dumps(self.rubric, indent=2) + "\n"}


def _leaf(leaf_id: str, requirement: str, check: str, weight: int, category: str) -> dict:
    return {"id": leaf_id, "requirements": requirement, "weight": weight, "sub_tasks": [],
            "task_category": category, "finegrained_task_category": "Method Implementation", "check": check}


def _rubric(task_id: str, title: str, fname: str, content: list[dict]) -> dict:
    leaves = [_leaf("any-file", "The submission directory contains at least one file.", 'test -n "$(ls -A)"', 1,
                    "Code Development"),
              _leaf("file-exists", f"A file named {fname} exists in the submission directory.", f"test -f {fname}", 1,
                    "Code Development"), *content]
    return {"id": f"{task_id}-root", "requirements": f"The task \"{title}\" is done.", "weight": 1,
            "sub_tasks": leaves, "task_category": None, "finegrained_task_category": None}


def _call(cmd: str) -> str:
    return "<tool_call>\n" + json.dumps({"name": "bash", "arguments": {"cmd": cmd}}) + "\n</tool_call>"


def _paper(title: str, text: str, cmds: list[str]) -> str:
    calls = "\n\n".join(_call(c) for c in cmds)
    how = "This tool call does it:" if len(cmds) == 1 else "These tool calls, one after the other, do it:"
    return f"# {title}\n\n{text}\n\n{how}\n\n{calls}\n\nThen call `end_task`.\n"


# ---- the kinds: rng -> (title, text, addendum, file name, content leaves, commands) ------------------------


def _write_word(r: random.Random):
    word, fname = r.choice(WORDS), r.choice(FILES) + ".txt"
    cmd = f"echo {word} > {fname}"
    leaves = [_leaf("correct", f"{fname} holds the word {word}.", f"grep -qx '{word} *' {fname}", 2, "Result Analysis")]
    return (f"Write the word {word} into {fname}", f"Write the word `{word}` into a file named `{fname}` in your "
            "working directory.", "Only the word matters; a trailing newline is fine.", fname, leaves, [cmd])


def _compute(r: random.Random):
    op = r.choice(sorted(OPS))
    a = r.randint(2, 19) if op == "*" else r.randint(10, 99)
    b = r.randint(2, 9) if op == "*" else r.randint(2, min(49, a - 1))  # results stay positive
    result, fname = eval(f"{a} {op} {b}"), r.choice(FILES) + ".txt"  # noqa: S307 -- two literal ints
    cmd = f"python3 -c 'print({a} {op} {b})' > {fname}"
    leaves = [_leaf("correct", f"{fname} holds the number {result}.", f"grep -qw -- {result} {fname}", 2,
                    "Result Analysis")]
    return (f"Compute {a} {OPS[op][1]} {b} into {fname}", f"Compute {a} {OPS[op][1]} {b} and write the result, as "
            f"digits, into a file named `{fname}` in your working directory.",
            "Only the number matters; whitespace around it is fine.", fname, leaves, [cmd])


def _fix_bug(r: random.Random):
    op, fn = r.choice(sorted(OPS)), r.choice(FUNCS)
    verb, _, wrong = OPS[op]
    x, y = r.randint(3, 9), r.randint(2, 3)
    want = eval(f"{x} {op} {y}")  # noqa: S307 -- two literal ints
    fname = f"{fn}.py"
    cmd = f"printf 'def {fn}(a, b):\\n    return a {op} b\\n' > {fname}"
    leaves = [_leaf("correct", f"{fname} defines {fn}(a, b) and {fn}({x}, {y}) == {want}.",
                    f"python3 -c 'from {fn} import {fn}; assert {fn}({x}, {y}) == {want}'", 2, "Code Execution")]
    text = (f"The function `{fn}` is supposed to take two numbers and return `a {op} b` (it {verb} them), but it "
            f"has a bug on one line:\n\n    def {fn}(a, b):\n        return a {wrong} b\n\nWrite the fixed function "
            f"into a file named `{fname}` in your working directory, so that `{fn}({x}, {y})` returns `{want}`.")
    return (f"Fix the operator in {fn}.py ({x} {OPS[op][1]} {y})", text,
            f"The file must define `{fn}(a, b)` at the top level; no other files are needed.", fname, leaves, [cmd])


def _edit_file(r: random.Random):
    key, fname = r.choice(KEYS), r.choice(FILES) + ".cfg"
    old, new = r.sample(WORDS, 2)
    cmds = [f"echo '{key} = {old}' > {fname}", f"sed -i 's/{old}/{new}/' {fname}"]
    leaves = [_leaf("key-line", f"{fname} has a line setting {key}.", f"grep -q '^{key} *=' {fname}", 1,
                    "Code Development"),
              _leaf("edited", f"{fname} sets {key} to {new}, and {old} is gone.",
                    f"grep -qx '{key} = {new}' {fname} && ! grep -q {old} {fname}", 1, "Result Analysis")]
    text = (f"Create a file named `{fname}` in your working directory holding the line `{key} = {old}`, then edit "
            f"that file in place so that the line reads `{key} = {new}`.")
    return (f"Set {key} from {old} to {new} in {fname}", text, "Only the final file is graded.", fname, leaves, cmds)


def _write_lines(r: random.Random):
    words, fname = r.sample(WORDS, 3), r.choice(FILES) + ".txt"
    cmd = f"printf '{words[0]}\\n{words[1]}\\n{words[2]}\\n' > {fname}"
    expected = "\\n".join(words)
    leaves = [_leaf("first-line", f"The first line of {fname} is {words[0]}.",
                    f"test \"$(head -n 1 {fname})\" = {words[0]}", 1, "Result Analysis"),
              _leaf("all-lines", f"{fname} holds {', '.join(words)}, one per line, in that order.",
                    f"test \"$(head -n 3 {fname})\" = \"$(printf '{expected}')\"", 1, "Result Analysis")]
    text = (f"Write the three words `{words[0]}`, `{words[1]}` and `{words[2]}`, one per line and in that order, into "
            f"a file named `{fname}` in your working directory.")
    return (f"List {', '.join(words)} in {fname}", text, "Nothing else needs to be in the file.", fname, leaves, [cmd])


MAKERS: dict[str, Callable] = {"write-word": _write_word, "compute": _compute, "fix-bug": _fix_bug,
                               "edit-file": _edit_file, "write-lines": _write_lines}


def generate_family(seed: int, n: int, eval_fraction: float = 0.3, kinds: tuple[str, ...] = KINDS,
                    prefix: str = "fam") -> list[FamilyTask]:
    """`n` tasks from `seed`, kinds in turn, titles unique; deterministic (the same arguments, the same tasks)."""
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"--n must be a positive integer, got {n!r}")
    if not 0.0 <= eval_fraction < 1.0:
        raise ConfigError(f"--eval-fraction must be in [0, 1), got {eval_fraction!r}")
    bad = [k for k in kinds if k not in MAKERS]
    if bad or not kinds:
        raise ConfigError(f"unknown task kind {bad[0] if bad else None!r} (kinds: {', '.join(KINDS)})")
    r = random.Random(f"klong-task-family:{seed}")  # str seeds hash stably across processes
    held_out: set = set()  # per kind, so that both splits hold every kind
    for kind in kinds:
        idx = [i for i in range(n) if kinds[i % len(kinds)] == kind]
        held_out.update(r.sample(idx, round(len(idx) * eval_fraction)))
    if n >= 2 and eval_fraction > 0 and not held_out:
        held_out = {r.randrange(n)}
    if len(held_out) == n:
        held_out.discard(min(held_out))
    out, titles = [], set()
    for i in range(n):
        kind = kinds[i % len(kinds)]
        for _ in range(1000):  # a title seen already: draw again (unique titles keep the splits apart)
            title, text, addendum, fname, leaves, cmds = MAKERS[kind](r)
            if title not in titles:
                break
        else:
            raise ConfigError(f"cannot draw {n} distinct {kind} tasks; ask for fewer")
        titles.add(title)
        digest = hashlib.sha256(f"{seed}:{i}:{title}".encode()).hexdigest()[:6]
        task_id = f"{prefix}-{kind}-{i:03d}-{digest}"
        out.append(FamilyTask(task_id, kind, "eval" if i in held_out else "train", title, _paper(title, text, cmds),
                              addendum, _rubric(task_id, title, fname, leaves), tuple(cmds)))
    return out


def write_family(tasks: list[FamilyTask], out_dir: str | Path) -> dict[str, list[Path]]:
    """Writes OUT/<split>/<task_id>/ folders (config.yaml, paper.md, addendum.md, rubric.json, blacklist.txt)
    and OUT/family.json (seed-independent index: id, kind, split, title, solution); returns split -> folders."""
    root = Path(out_dir)
    dirs: dict[str, list[Path]] = {"train": [], "eval": []}
    for t in tasks:
        d = root / t.split / t.task_id
        d.mkdir(parents=True, exist_ok=True)
        for name, text in t.files().items():
            (d / name).write_text(text)
        dirs[t.split].append(d)
    index = [{"task_id": t.task_id, "kind": t.kind, "split": t.split, "title": t.title, "solution": list(t.solution)}
             for t in tasks]
    (root / "family.json").write_text(json.dumps(index, indent=1) + "\n")
    return dirs
