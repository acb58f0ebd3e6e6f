"""README runs as written: every ```sh block either runs here, exactly as printed, in a fresh data home (in
document order, one shell, `set -e`), or says it is an example on its first line (`# example: ...`, for
placeholders, long-running or machine-specific commands). In example blocks every `klong ...` line must
still name a real command and only options that command has, so a renamed flag cannot hide there."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from services.broker import free_port
from klong.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)


def sh_blocks() -> list[tuple[int, str]]:
    """(line number, body) of every ```sh block of README.md."""
    text = (ROOT / "README.md").read_text()
    return [(text[:m.start()].count("\n") + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == "sh"]


def is_example(body: str) -> bool:
    return body.lstrip().lower().startswith("# example")


def klong_lines(body: str) -> list[list[str]]:
    """The `klong ...` commands of a block (also after `&&`), as argv lists without the leading `klong`."""
    out = []
    for line in body.splitlines():
        for part in re.split(r"&&|;", line):
            part = part.strip()
            if part.startswith("klong "):
                try:
                    argv = shlex.split(part, comments=True)[1:]
                except ValueError:  # an unbalanced quote in a placeholder line: checked by eye, not here
                    continue
                out.append(argv)
    return out


def subparser(argv: list[str]):
    """The argparse parser of `klong argv...` (walking sub-commands), and the rest of argv."""
    parser = build_parser()
    while True:
        actions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not actions or not argv or argv[0] not in actions[0].choices:
            return parser, argv
        parser, argv = actions[0].choices[argv[0]], argv[1:]


def test_every_block_is_runnable_or_marked_example():
    blocks = sh_blocks()
    assert blocks, "README has no sh blocks"
    for line, body in blocks:
        if is_example(body):
            continue
        defined = set(re.findall(r"^([A-Z_]+)=", body, re.M))  # RUN_DIR=$(...) sets what later lines use
        words = set(re.findall(r"\b(URL|NAME|RUN_DIR|MODEL_DIR|CHECKPOINT)\b", body)) - defined
        assert not words and not re.search(r"\.\.\.|\[--", body), \
            f"README.md:{line}: a block with placeholders must start with '# example: ...'"


@pytest.mark.parametrize("line,argv", [(ln, a) for ln, b in sh_blocks() for a in klong_lines(b)],
                         ids=lambda v: str(v) if isinstance(v, int) else " ".join(v[:2]))
def test_every_klong_line_names_a_real_command_and_options(line, argv):
    parser, rest = subparser(argv)
    assert parser.prog != "klong", f"README.md:{line}: `klong {argv[0]}` is not a command"
    known = {s for a in parser._actions for s in a.option_strings}
    for tok in rest:
        flag = tok.strip("[]").split("=", 1)[0]
        if flag.startswith("--"):
            assert flag in known, f"README.md:{line}: `klong {' '.join(argv[:2])}` has no option {flag}"


@pytest.mark.timeout(1800)  # the blocks train for a minute on an idle machine; a loaded CI machine takes several
def test_runnable_blocks_run_as_written(tmp_path):
    """Every block not marked as an example, in order, in one shell against a fresh home, from a directory that
    has the repository's `tasks/` (the one block that names it says to stand there) and nothing else: the
    example configs (`--config examples/sft.yaml`) are found from the installed package."""
    script = "\n".join(body for _, body in sh_blocks() if not is_example(body))
    venv_bin = ROOT / ".venv" / "bin"
    env = {**os.environ, "KLONG_HOME": str(tmp_path / "home"), "KLONG_BROKER_PORT": str(free_port()),
           "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    for k in ("KLONG_BOOTSTRAP_SERVERS", "KLONG_TOPIC_PREFIX"):
        env.pop(k, None)
    work = tmp_path / "work"  # the repository's folders the blocks name, without writing into the checkout
    work.mkdir()
    (work / "tasks").symlink_to(ROOT / "tasks")
    try:
        out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env, capture_output=True,
                             text=True, timeout=1500)
        assert out.returncode == 0, f"stdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-3000:]}"
    finally:  # a failed block must not leave the broker running
        subprocess.run([str(venv_bin / "klong"), "broker", "stop"], env=env, capture_output=True, timeout=60)
