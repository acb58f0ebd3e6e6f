"""`klong archive verify|repair`: check the archive against its flush manifests; move damaged flushes aside
and re-fetch what is damaged or missing from Kafka (store.integrity).

    klong archive verify            # exit 1 and one line per damaged flush or missing range
    klong archive repair            # quarantine damaged flushes, re-fetch damaged and missing offsets from Kafka
    klong archive repair --no-refetch   # only move damaged flushes aside (queries work again; nothing is deleted)

Stray entries (a file or symlink that is not part of the layout) are listed as warnings: every reader
skips them, so they never fail a check. `verify` asks Kafka (when it answers) for the sink's committed
offsets, so a lost last flush of a partition is found too.
"""

from __future__ import annotations

import argparse
from pathlib import PurePosixPath


def _settings(args):
    from core.settings import Settings

    return Settings.load(args.home, args.bootstrap_servers, args.topic_prefix)


def _committed(s, timeout_s: float):
    """The sink group's committed offsets, or (None, why) when no Kafka answers."""
    from kafka.errors import KafkaError

    from services.broker import probe_kafka
    from schemas.errors import KlongError
    from store.integrity import committed_offsets
    from store.refetch import KafkaSide

    try:
        probe_kafka(s, timeout_s)
        with KafkaSide(s) as kafka:
            return committed_offsets(kafka), ""
    except (KlongError, KafkaError) as e:
        return None, str(e).splitlines()[0]


def _relative(path, archive):
    """`path` as printed: relative to the archive (a directory, or an S3 prefix's `bucket/prefix`)."""
    from core.objstore import is_s3

    root = PurePosixPath(archive.root) if is_s3(archive) else archive
    return path.relative_to(root) if path.is_relative_to(root) else path


def cmd_verify(args) -> int:
    from store.integrity import quarantined, verify

    s = _settings(args)
    committed, why = _committed(s, args.kafka_timeout)
    archive = s.archive  # a directory, or an S3 prefix (KLONG_ARCHIVE_URL)
    problems = verify(archive, committed)
    for p in problems:
        where = _relative(p.path, archive)
        label = {"damaged": "BAD", "missing": "MISSING", "stray": "warning: stray"}[p.kind]
        print(f"{label} {where}: {p.what}")
    from store.archive import list_flushes

    bad = [p for p in problems if p.kind != "stray"]
    held = quarantined(archive)
    print(f"{len(list_flushes(archive))} flush directories checked, "
          f"{len({p.path for p in bad if p.kind == 'damaged'})} bad, {sum(p.kind == 'missing' for p in bad)} ranges "
          f"missing, {sum(p.kind == 'stray' for p in problems)} stray entries ignored"
          + (f"; {len(held)} quarantined under {archive}/_quarantine" if held else ""))
    if committed is None:
        print(f"Kafka not reached ({why}): the offsets after each partition's last flush were not checked")
    if bad:
        print("run `klong archive repair` to move damaged flushes aside and re-fetch their offsets from Kafka")
    return 1 if bad else 0


def cmd_repair(args) -> int:
    from store.integrity import repair

    s = _settings(args)
    report = repair(s, refetch=not args.no_refetch, timeout_s=args.timeout)
    for st in report.strays:
        print(f"warning: stray {st.path}: {st.why} (ignored by every reader; left in place)")
    for p in report.quarantined:
        print(f"quarantined {p}")
    for p in report.refetched:
        print(f"re-fetched from Kafka: {_relative(p, s.archive)}")
    for line in report.lost:
        print(f"NOT re-fetched: {line}")
    if not report.quarantined and not report.refetched and not report.lost:
        print("archive is good: nothing to repair")
    return 1 if report.lost else 0


def register(sub, common) -> None:
    a = sub.add_parser("archive", parents=[common], help="verify / repair the Parquet archive",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    asub = a.add_subparsers(dest="action", required=True, metavar="ACTION")
    v = asub.add_parser("verify", parents=[common], help="read every archived file, check it against its flush's "
                        "manifest and find missing offset ranges (exit 1 when something is damaged or missing)")
    v.add_argument("--kafka-timeout", type=float, default=5.0,
                   help="seconds to wait for Kafka's committed offsets (default 5; without them the stretch "
                        "after each partition's last flush is not checked)")
    v.set_defaults(func=cmd_verify)
    r = asub.add_parser("repair", parents=[common], help="move damaged flush directories to archive/_quarantine "
                        "and re-fetch damaged and missing offsets from Kafka (exit 1 when some could not be re-fetched)")
    r.add_argument("--no-refetch", action="store_true", help="only quarantine; do not read Kafka")
    r.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for one range from Kafka (default 60)")
    r.set_defaults(func=cmd_repair)
