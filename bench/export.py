"""Benchmark: `klong dataset export` throughput beside a plain pyarrow read + write of the same bytes (issue 13).

    .venv/bin/python bench/export.py [--rollouts 24 --turns 300] [--max-tokens 16384] [--format trl]

Builds an RL dataset version from a simulated archive (`bench/materialize.py`'s generator: ~10k-token pinned
prefix, lognormal observations, actions with logprobs; the real builder), then measured in the same run:

- export: `trainer.export.export_dataset` (reader open with the content-hash check, gather of every
          sample's tokens, loss mask, logprobs and advantages, Parquet write), best of 2;
- peer:   pyarrow reading the export's own Parquet files and writing them again with the same
          compression: what moving those bytes through Arrow and Parquet costs at the least, best of 2.

Prints one figure per line; goal: export / peer throughput >= 0.5.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loader import say  # noqa: E402
from bench.materialize import make_archive  # noqa: E402
from core.settings import Settings, Topics  # noqa: E402


def peer_seconds(files: list[Path], scratch: Path, compression: str) -> float:
    t0 = time.perf_counter()
    for i, f in enumerate(files):
        table = pq.read_table(f)
        pq.write_table(table, scratch / f"copy-{i}.parquet", compression=compression,
                       row_group_size=max(1, pq.ParquetFile(f).metadata.row_group(0).num_rows))
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rollouts", type=int, default=24)
    ap.add_argument("--turns", type=int, default=300)
    ap.add_argument("--max-tokens", type=int, default=16384, help="the dataset's L_max")
    ap.add_argument("--format", default="trl", choices=["hf", "trl", "verl"])
    args = ap.parse_args()

    from consumers.materialize import build_version
    from trainer.export import export_dataset

    with tempfile.TemporaryDirectory(prefix="klong-bench-export-") as tmp:
        home = Path(tmp)
        make_archive(Settings(home=home, bootstrap_servers="unused:9", topics=Topics("bench")), args.rollouts,
                     args.turns)
        built = build_version(home, "bench", "rl", {"max_tokens": args.max_tokens, "overlap_turns": 2})
        c = built.manifest["counts"]
        print(f"dataset {built.ref}: {c['samples']} samples, {c['tokens']:,} unique tokens stored, L_max {args.max_tokens}")
        t_export, report = float("inf"), None
        for k in range(2):
            t0 = time.perf_counter()
            report = export_dataset(home, built.ref, args.format, home / f"export-{k}")
            t_export = min(t_export, time.perf_counter() - t0)
        t_peer = float("inf")
        for k in range(2):
            scratch = home / f"peer-{k}"
            scratch.mkdir()
            t_peer = min(t_peer, peer_seconds(report.files, scratch, "zstd"))
            shutil.rmtree(scratch)
        mb = report.bytes / 1e6
        print(f"export ({args.format}): {report.samples} samples, {report.tokens:,} tokens, {mb:.1f} MB of Parquet "
              f"in {len(report.files)} file(s)")
        say("export", report.tokens / t_export / 1e6, "Mtok/s", f"({mb / t_export:.1f} MB/s written)")
        say("pyarrow read + write of the same files", report.tokens / t_peer / 1e6, "Mtok/s", f"({mb / t_peer:.1f} MB/s)")
        say("export / pyarrow read+write", t_peer / t_export, "x", "(goal >= 0.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
