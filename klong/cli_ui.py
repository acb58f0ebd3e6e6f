"""`klong ui` and `klong report`: look at the archive in a browser, and the paper's plots as PNG files.

    klong ui [--port 8765] [--host 127.0.0.1]  # read-only web viewer on http://127.0.0.1:8765/ (ui.app)
    klong report [--plan NAME] [-o report/]    # stages.png rl_curves.png training.png windows.png (ui.report)

`ui` serves until Ctrl-C: the rollouts list (filter by task, group, stage, iteration, status, score; sort;
paged), full-text search over steps (through a word index it keeps under HOME/index/steps/), a group's rollouts side by side, one rollout as a conversation (pinned
prefix, tool calls, carry-overs, policy versions, timing; long outputs collapsed; j/k steps, n/p rollouts), a
dataset version's windows laid over it, a step's tokens coloured by log-prob with a window's loss mask, judge
results as rubric trees, blacklist hits, a read-only SQL box with CSV download, and the report's plots.

Only its user drives it: it answers to requests whose Host is 127.0.0.1, localhost or the --host value;
the SQL box runs by POST from its own page (a per-process token); every query of the SQL box and of the
search stops at --sql-timeout, --sql-max-rows and --sql-max-mb, and when its client leaves. `report` writes the figures from SQL over the catalog's views; `--plan` keeps one
progressive-RL plan's rollouts, datasets and training runs.
"""

from __future__ import annotations

import argparse


def _settings(args):
    from core.settings import Settings

    return Settings.load(args.home, args.bootstrap_servers, args.topic_prefix)


def cmd_ui(args) -> int:
    from ui.app import create_app, serve

    from ui.query import Limits

    limits = Limits(timeout_s=args.sql_timeout, max_rows=args.sql_max_rows, max_bytes=int(args.sql_max_mb * 2**20))
    app = create_app(_settings(args), first_steps=args.first_steps, host=args.host, limits=limits,
                     memory_limit=args.memory_limit, tokenizer=args.tokenizer)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"klong ui: http://{shown}:{args.port}/ (read-only; Ctrl-C stops)", flush=True)
    serve(app, port=args.port, host=args.host)
    return 0


def cmd_report(args) -> int:
    from store.catalog import Catalog
    from ui.report import write_report

    for path in write_report(Catalog(_settings(args)), args.output, plan=args.plan):
        print(path)
    return 0


def register(sub, common) -> None:
    """Adds `klong ui` and `klong report` to the `klong` parser."""
    u = sub.add_parser("ui", parents=[common], help="read-only web viewer of rollouts, datasets, judge results "
                       "and plots on 127.0.0.1", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    u.add_argument("--port", type=int, default=8765, help="port to serve on (default 8765)")
    u.add_argument("--host", default="127.0.0.1", help="address to serve on, and the one Host name it answers to "
                   "besides 127.0.0.1 and localhost (default 127.0.0.1: this machine only)")
    u.add_argument("--sql-timeout", type=float, default=30.0, help="seconds a query of the SQL box or the search "
                   "may run before it is stopped (default 30)")
    u.add_argument("--sql-max-rows", type=int, default=1_000_000, help="rows a query may return; a CSV download past "
                   "it fails (default 1000000)")
    u.add_argument("--sql-max-mb", type=float, default=256, help="MiB a query's result may take (default 256)")
    u.add_argument("--memory-limit", default="2GB", help="DuckDB memory limit of each query; larger work spills to a "
                   "private directory in the data home (default 2GB)")
    u.add_argument("--tokenizer", help="tokenizer (\"bytes\", a tokenizer.json or a model directory or name in "
                   "HOME/models) for token texts in the token view when the chosen dataset names none")
    u.add_argument("--first-steps", type=int, default=200, help="steps of a rollout rendered with its page; the page "
                   "loads the rest right after (default 200)")
    u.set_defaults(func=cmd_ui)

    r = sub.add_parser("report", parents=[common], help="the paper's plots (turns, hours, score per stage; RL "
                       "curves; training loss; window lengths) as PNG files", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--plan", help="only this progressive-RL plan's rollouts, datasets and training runs "
                                  "(default: everything in the archive)")
    r.add_argument("-o", "--output", default="report", help="directory for the PNG files (default ./report)")
    r.set_defaults(func=cmd_report)
