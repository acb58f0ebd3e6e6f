"""`klong ui` and `klong report`: look at the archive in a browser, and the paper's plots as PNG files.

    klong ui [--port 8765]                     # read-only web viewer on http://127.0.0.1:8765/ (store.ui.app)
    klong report [--plan NAME] [-o report/]    # stages.png rl_curves.png training.png windows.png (store.report)

`ui` serves until Ctrl-C: the rollouts list (filter, sort), one rollout as a conversation (pinned prefix,
tool calls, carry-overs, policy versions, timing; long outputs collapsed), a dataset version's windows laid
over it, judge results as rubric trees, blacklist hits, a read-only SQL box with CSV download, and the
report's plots. `report` writes the figures from SQL over the catalog's views; `--plan` keeps one
progressive-RL plan's rollouts, datasets and training runs.
"""

from __future__ import annotations

import argparse


def _settings(args):
    from klong.settings import Settings

    return Settings.load(args.home, args.bootstrap_servers, args.topic_prefix)


def cmd_ui(args) -> int:
    from store.ui.app import create_app, serve

    app = create_app(_settings(args), first_steps=args.first_steps)
    print(f"klong ui: http://127.0.0.1:{args.port}/ (read-only; Ctrl-C stops)", flush=True)
    serve(app, port=args.port)
    return 0


def cmd_report(args) -> int:
    from store.catalog import Catalog
    from store.report import write_report

    for path in write_report(Catalog(_settings(args)), args.output, plan=args.plan):
        print(path)
    return 0


def register(sub, common) -> None:
    """Adds `klong ui` and `klong report` to the `klong` parser."""
    u = sub.add_parser("ui", parents=[common], help="read-only web viewer of rollouts, datasets, judge results "
                       "and plots on 127.0.0.1", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    u.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 to serve on (default 8765)")
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
