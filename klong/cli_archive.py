"""`klong archive verify|repair`: check every archived file; move damaged flushes aside and rebuild them
from Kafka (store.integrity).

    klong archive verify            # exit 1 and one line per problem when something is damaged
    klong archive repair            # quarantine damaged flush directories, re-fetch their offsets from Kafka
    klong archive repair --no-refetch   # only move them aside (queries work again; nothing is deleted)
"""

from __future__ import annotations

import argparse


def _settings(args):
    from klong.settings import Settings

    return Settings.load(args.home, args.bootstrap_servers, args.topic_prefix)


def cmd_verify(args) -> int:
    from store.archive import list_flushes
    from store.integrity import quarantined, verify

    s = _settings(args)
    problems = verify(s.archive_dir)
    for p in problems:
        print(f"BAD {p.flush.path.relative_to(s.archive_dir)}: {p.what}")
    held = quarantined(s.archive_dir)
    n = len(list_flushes(s.archive_dir))
    print(f"{n} flush directories checked, {len({p.flush.path for p in problems})} bad"
          + (f"; {len(held)} quarantined under {s.archive_dir / '_quarantine'}" if held else ""))
    if problems:
        print("run `klong archive repair` to move them aside and re-fetch their offsets from Kafka")
    return 1 if problems else 0


def cmd_repair(args) -> int:
    from store.integrity import repair

    s = _settings(args)
    report = repair(s, refetch=not args.no_refetch, timeout_s=args.timeout)
    for p in report.quarantined:
        print(f"quarantined {p}")
    for p in report.refetched:
        print(f"re-fetched from Kafka: {p.relative_to(s.archive_dir)}")
    for line in report.lost:
        print(f"NOT re-fetched: {line}")
    if not report.quarantined:
        print("archive is good: nothing to repair")
    return 1 if report.lost else 0


def register(sub, common) -> None:
    a = sub.add_parser("archive", parents=[common], help="verify / repair the Parquet archive",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    asub = a.add_subparsers(dest="action", required=True, metavar="ACTION")
    v = asub.add_parser("verify", parents=[common], help="read every archived file; check rows against offsets "
                        "(exit 1 when something is damaged)")
    v.set_defaults(func=cmd_verify)
    r = asub.add_parser("repair", parents=[common], help="move damaged flush directories to archive/_quarantine "
                        "and re-fetch their offsets from Kafka (exit 1 when some could not be re-fetched)")
    r.add_argument("--no-refetch", action="store_true", help="only quarantine; do not read Kafka")
    r.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for one range from Kafka (default 60)")
    r.set_defaults(func=cmd_repair)
