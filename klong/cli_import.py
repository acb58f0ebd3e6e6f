"""`klong import trajectories FILE`: teacher trajectories (OpenAI chat-messages JSONL) -> rollout events.

    klong import trajectories teacher.jsonl                         # text-only steps, paper-reading prefix rule
    klong import trajectories teacher.jsonl --tokenizer MODEL_DIR   # ids rendered with its chat template
    klong import trajectories teacher.jsonl --prefix-steps 2 --dry-run
    klong import trajectories trajectory.json --task-id fre       # Harbor ATIF / mini-SWE-agent / SWE-agent

Every row is checked before anything is sent; bad rows are listed with their line number and skipped
(`--strict`: nothing is imported if any row is bad). Prints a summary on stdout. Exit status: 0 all
rows imported (or already imported), 1 some rows skipped, 2 nothing done (error). The library is
`producers.importer`.
"""

from __future__ import annotations

import argparse
import os
import sys

MAX_LISTED = 50  # skipped rows listed one per line; the rest are counted


def _settings(args):
    from core.settings import Settings

    return Settings.load(args.home, args.bootstrap_servers, args.topic_prefix)


def cmd_trajectories(args) -> int:
    from klong.cli_output import _progress
    from producers.importer import ImportOptions, import_trajectories

    tokenizer = args.tokenizer or os.environ.get("KLONG_IMPORT_TOKENIZER") or None
    if tokenizer and tokenizer != "bytes" and os.sep not in tokenizer and not os.path.exists(tokenizer):  # a NAME
        from trainer.model_import import resolve_model_dir

        tokenizer = str(resolve_model_dir(tokenizer, _settings(args).home))
    opts = ImportOptions(tokenizer=tokenizer, prefix_steps=args.prefix_steps, paper_rule=not args.no_paper_rule,
                         group_field=args.group_field, timeout_s=args.timeout_s, strict=args.strict,
                         dry_run=args.dry_run, format=args.format, task_id=args.task_id)
    check_bar = _progress("checking", unit="rows", quiet=args.quiet)
    send_bar = None

    def sent(n: int) -> None:
        nonlocal send_bar
        if send_bar is None:
            check_bar.close()
            send_bar = _progress("importing", unit="rows", quiet=args.quiet)
        send_bar.update(n - send_bar.n)

    try:
        report = import_trajectories(_settings(args), args.file, opts, progress=sent, flush_timeout=args.flush_timeout,
                                     checked=lambda n: check_bar.update(n - check_bar.n))
    finally:
        check_bar.close()
        if send_bar is not None:
            send_bar.close()
    verb = "would import" if args.dry_run else "imported"
    scored = sum(r.score is not None for r in report.imported)
    pinned = sum(r.prefix for r in report.imported)
    print(f"{verb} {len(report.imported)} rows as rollouts ({report.steps} steps, {pinned} pinned, {scored} scored"
          + (f", {report.events} events" if not args.dry_run else "") + f") from {args.file}")
    if report.already:
        print(f"already imported, skipped: {len(report.already)} rows")
    if report.skipped:
        print(f"skipped {len(report.skipped)} bad rows:")
        for line, reason in report.skipped[:MAX_LISTED]:
            print(f"  line {line}: {reason}")
        if len(report.skipped) > MAX_LISTED:
            print(f"  ... and {len(report.skipped) - MAX_LISTED} more")
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if report.imported and not args.dry_run:
        print("archive them with `klong sink run --until-idle`; see them with "
              "`klong sql \"SELECT * FROM rollouts WHERE scaffold = 'import'\"`")
    return 1 if report.skipped else 0


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def register(sub, common) -> None:
    p = sub.add_parser("import", parents=[common], help="import data from outside: teacher trajectories",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    t = what.add_parser("trajectories", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
                        help="OpenAI chat-messages JSONL rows (messages, task_id, optional score/id) -> rollouts",
                        description=__doc__ + "\n" + ROW_HELP)
    t.add_argument("file", help="JSONL file, one trajectory per line; or one ATIF / mini-SWE-agent / SWE-agent "
                                "trajectory file")
    t.add_argument("--format", choices=["auto", "openai", "atif", "mini-swe", "swe-agent"], default="auto",
                   help="openai: chat-messages rows; atif: Harbor's Agent Trajectory Interchange Format (its token "
                        "ids kept, its sub-agents' trajectories imported as rollouts of their own); mini-swe: "
                        "mini-SWE-agent .traj.json; swe-agent: SWE-agent .traj (its `history`); auto (default): "
                        "detected per trajectory")
    t.add_argument("--task-id", metavar="ID",
                   help="the registered task of ATIF / mini-SWE-agent / SWE-agent trajectories (they do not name one)")
    t.add_argument("--tokenizer", help="compute token_ids at import: a model directory (HOME/models/NAME from "
                                       "`klong model import`) renders each row with its chat template and the row's "
                                       "`tools`; a bare tokenizer.json or 'bytes' encodes each message alone; "
                                       "default: text-only steps, tokenized when a dataset is built "
                                       "(env KLONG_IMPORT_TOKENIZER)")
    t.add_argument("--prefix-steps", type=_nonneg_int, metavar="N",
                   help="pin the first N steps of every row instead of the prefix rule (a row's `pinned_steps` wins)")
    t.add_argument("--no-paper-rule", action="store_true",
                   help="pin only the system messages and the first user message, not the paper reading after them")
    t.add_argument("--group-field", metavar="FIELD",
                   help="row field holding the group id (default: the row's group_id, else its task_id)")
    t.add_argument("--timeout-s", type=float, default=43200.0,
                   help="timeout_s recorded on the imported rollouts (default 43200, 12 h)")
    t.add_argument("--strict", action="store_true", help="import nothing if any row is bad")
    t.add_argument("--dry-run", action="store_true", help="check every row and print the summary; send nothing")
    t.add_argument("--flush-timeout", type=float, default=120.0,
                   help="seconds to wait for Kafka to ack the events (default 120)")
    t.set_defaults(func=cmd_trajectories)


ROW_HELP = """A row: {"task_id": "fre", "messages": [{"role": "system", "content": "..."}, {"role": "user", ...},
  {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
   "function": {"name": "read_file_chunk", "arguments": "{\\"file\\": \\"/home/paper/paper.md\\"}"}}]},
  {"role": "tool", "tool_call_id": "c1", "content": "..."}, ...],
  "score": 0.8, "id": "traj-17", "group_id": "...", "pinned_steps": 4, "model": "...",
  "tools": [{"type": "function", "function": {"name": "bash", "parameters": {...}}}]}   (score..tools optional)
The task must be registered (`klong tasks import DIR --split train`). Pinned prefix: system messages, the first
user message, then the assistant tool calls that read the paper (/home/paper/..., paper.md, paper.pdf) and
their outputs, up to the first step that is not paper reading."""
