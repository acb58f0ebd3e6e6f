"""`klong broker|sink|sql|simulate|schemas|status|demo`: the commands of the first stage, events in and out.

    klong broker start                     # the embedded Kafka-compatible broker (Tansu) of the home
    klong simulate --rollouts 8            # synthetic rollouts through the recorder SDK
    klong sink run --until-idle            # Kafka -> Parquet archive (exactly-once)
    klong sql "SELECT count(*) FROM steps" # read-only DuckDB over the archive
    klong status                           # per-partition lag, archive counts, dead letters

Each command is a thin wrapper over its library module; `register(sub, common)` adds their pages to `klong`.
"""

from __future__ import annotations

import json
import sys

from core.procs import signals_to
from klong.cli_output import _print_table, _progress
from schemas.errors import KlongError


def _settings(args):
    from core.settings import Settings

    return Settings.load(args.home, args.bootstrap_servers, args.topic_prefix, getattr(args, "partitions", None))


# ---- commands ---------------------------------------------------------------------------------------


def cmd_broker(args) -> int:
    from services.broker import BrokerProcess, start_embedded

    s = _settings(args)
    if args.action == "start":
        b = start_embedded(s, args.port)
        print(f"broker running: pid {b.pid}, bootstrap {b.bootstrap}, home {s.home}")
    elif args.action == "stop":
        b = BrokerProcess.from_state(s.broker_file)
        if b is None:
            print(f"no broker recorded in {s.home}")
            return 0
        b.stop()
        print(f"broker stopped (pid {b.pid})")
    else:
        b = BrokerProcess.from_state(s.broker_file)
        if b and b.alive():
            print(f"running: pid {b.pid}, bootstrap {b.bootstrap}")
        else:
            print("not running")
            return 1
    return 0


def cmd_sink(args) -> int:
    from consumers.sink import Sink

    s = _settings(args)
    stop = {"now": False}

    def on_signal(*_):
        stop["now"] = True

    sink = Sink(s, flush_interval_s=args.flush_interval, flush_bytes=args.flush_mb << 20, group=args.group,
                writers=args.writers)
    bar = _progress("archiving", unit="ev", quiet=args.quiet)
    with signals_to(on_signal):
        stats = sink.run(until_idle=args.until_idle, should_stop=lambda: stop["now"],
                         progress=lambda st: bar.update(st.events + st.dead_letters - bar.n))
    bar.close()
    print(f"sink: {stats.events} events archived in {stats.flushes} flushes, {stats.dead_letters} dead letters")
    return 0


def cmd_sql(args) -> int:
    from store.catalog import Catalog, QueryError
    from store.integrity import quarantined
    from store.views import suggest_view, user_views

    s = _settings(args)
    if args.views:
        for name, cols in user_views(s):
            print(f"{name}: " + ", ".join(f"{c} {t}" for c, t in cols))
        return 0
    if not args.query:
        raise KlongError("give a query (SELECT ...), or --views to list the views")
    try:
        table = Catalog(s).arrow(args.query)
    except QueryError as e:
        hint = suggest_view(str(e), s)
        raise QueryError(f"{e}{hint}") if hint else e
    _print_table(table, args.format, args.output)
    held = quarantined(s.archive)
    if held:  # the answer leaves those events out: say so
        print(f"warning: {len(held)} damaged flush directories are quarantined under {s.archive}/_quarantine "
              "and not in this answer (`klong archive repair` re-fetches them from Kafka)", file=sys.stderr)
    return 0


def cmd_simulate(args) -> int:
    from producers.outbox import Outbox
    from producers.simulate import simulate

    s = _settings(args)
    bar = _progress("simulating", unit="ev", quiet=args.quiet)
    # Synthetic data can be generated again, so the outbox lets go of it once Kafka acks it (a recorder
    # in a real scaffold keeps events until the sink has archived them).
    if bool(args.judge_url) != bool(args.judge_model):
        raise KlongError("--judge-url and --judge-model go together")
    from services.broker import probe_kafka

    probe_kafka(s, args.connect_timeout)  # no broker: fail now, not after generating everything
    with Outbox(s, fsync="batch", retain="acked") as outbox:
        try:
            summary = simulate(outbox, rollouts=args.rollouts, seed=args.seed, turns=(args.min_turns, args.max_turns),
                               synthetic_results=not args.judge_url, progress=lambda n: bar.update(n - bar.n))
            bar.close()
            outbox.flush(timeout=args.timeout)
        except KeyboardInterrupt:
            bar.close()
            print(f"klong simulate: interrupted. Kept: the events recorded so far ({outbox.pending()} of them not yet "
                  f"acked by Kafka stay in {outbox.directory} and are sent by the next `klong simulate` on this "
                  "home); the rollouts not reached were not simulated: run again (a new seed gives new ones)",
                  file=sys.stderr)
            return 130
    print(f"simulated {summary.rollouts} rollouts ({summary.rollouts_by_status}), {summary.steps} steps, "
          f"{summary.tokens} tokens, {summary.events} events; archive them with `klong sink run --until-idle`")
    if args.judge_url:  # the real judge path: grade every request against the endpoint, until none is left
        from consumers.grading import GraderConfig
        from consumers.judge import JudgeWorker

        stats = JudgeWorker(s, GraderConfig(base_url=args.judge_url, model=args.judge_model)).run(until_idle=True)
        print(f"judged: {stats}")
    return 0


def cmd_schemas(args) -> int:
    from schemas.jsonschema import export

    for path in export(args.dir):
        print(path)
    return 0


def cmd_status(args) -> int:
    from store.status import status

    report = status(_settings(args))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(f"home: {report['settings']['home']}   kafka: {report['settings']['bootstrap_servers']}")
    print("archive: " + ", ".join(f"{k} {v}" for k, v in report["archive"].items()))
    if report["partitions"] is None:
        print(f"kafka: {report['kafka_error']}")
    else:
        print(f"{'topic':40} {'part':>4} {'end':>10} {'archived':>10} {'lag':>8}")
        for p in report["partitions"]:
            print(f"{p['topic']:40} {p['partition']:>4} {p['end_offset']:>10} {p['archived_to']:>10} {p['lag']:>8}")
    return 0


def cmd_demo(args) -> int:
    from klong.demo import demo, demo_simulated

    if args.simulated:
        return demo_simulated(_settings(args), rollouts=args.rollouts, seed=args.seed, keep_broker=args.keep_broker,
                              port=args.port)
    return demo(_settings(args), keep=args.keep_broker, port=args.port, timeout_s=args.rollout_timeout,
                max_tokens=args.max_tokens, max_turns=args.max_turns)


# ---- parser -----------------------------------------------------------------------------------------


def register(sub, common) -> None:
    b = sub.add_parser("broker", parents=[common], help="start/stop the embedded Kafka-compatible broker (Tansu)")
    b.add_argument("action", choices=["start", "stop", "status"],
                   help="start: run it in the background (state in HOME/broker.json); stop; status: exit 0 if running")
    b.add_argument("--port", type=int, help="listen port (env KLONG_BROKER_PORT; default 9092)")
    b.add_argument("--partitions", type=int, help="partitions per topic (env KLONG_PARTITIONS; default 4)")
    b.set_defaults(func=cmd_broker)

    sk = sub.add_parser("sink", parents=[common], help="archive Kafka events into Parquet (exactly-once)")
    sk.add_argument("action", choices=["run"], help="run: consume every topic and archive it (Ctrl-C stops cleanly)")
    sk.add_argument("--until-idle", action="store_true", help="exit once every partition is archived and idle")
    sk.add_argument("--group", action="store_true", help="join the sink consumer group (several sinks split partitions)")
    sk.add_argument("--flush-interval", type=float, default=1.0, help="seconds between flushes (default 1.0)")
    sk.add_argument("--flush-mb", type=int, default=8, help="flush when this many MB are buffered (default 8)")
    sk.add_argument("--writers", type=int, default=1, help="writer processes that decode and write Parquet (default 1)")
    sk.set_defaults(func=cmd_sink)

    q = sub.add_parser("sql", parents=[common], help="run a read-only SQL query over the archive (DuckDB)")
    q.add_argument("query", nargs="?", help="SELECT ... over the views (`--views` lists them with their columns)")
    q.add_argument("--views", action="store_true", help="list the views you can query, with their columns, and exit")
    q.add_argument("--format", choices=["table", "csv", "json", "ndjson", "parquet"], default="table",
                   help="table (default; long cells cut), csv (lines end in \\n), json (one array), ndjson (an "
                        "object per line), parquet (needs --output)")
    q.add_argument("--output", "-o", help="write to this file instead of stdout (required for parquet)")
    q.set_defaults(func=cmd_sql)

    si = sub.add_parser("simulate", parents=[common], help="produce realistic synthetic rollouts through the recorder SDK")
    si.add_argument("--rollouts", type=int, default=24, help="rollouts to simulate (default 24)")
    si.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same rollouts (default 0)")
    si.add_argument("--min-turns", type=int, default=150, help="fewest assistant turns per rollout (default 150)")
    si.add_argument("--max-turns", type=int, default=400, help="most assistant turns per rollout (default 400)")
    si.add_argument("--timeout", type=float, default=300, help="seconds to wait for Kafka to take everything")
    si.add_argument("--connect-timeout", type=float, default=30,
                    help="seconds to wait for a Kafka broker to answer before anything is simulated (default 30)")
    si.add_argument("--judge-url", help="grade the judge requests with a real judge worker against this "
                                        "OpenAI-compatible endpoint (default: synthetic judge results)")
    si.add_argument("--judge-model", help="model name for --judge-url")
    si.set_defaults(func=cmd_simulate)

    sc = sub.add_parser("schemas", parents=[common], help="export the JSON Schema of every event type")
    sc.add_argument("action", choices=["export"], help="export: write the schemas")
    sc.add_argument("dir", help="directory for events.schema.json and <event_type>.schema.json (created)")
    sc.set_defaults(func=cmd_schemas)

    st = sub.add_parser("status", parents=[common], help="per-partition lag, archive counts, dead letters")
    st.add_argument("--json", action="store_true", help="the whole report as JSON (per partition: end_offset, "
                    "archived_to = the next offset the sink will read, lag)")
    st.set_defaults(func=cmd_status)

    d = sub.add_parser("demo", parents=[common], help="the main job with the real model: SmolLM2 served by vLLM, "
                       "rollouts -> dataset -> training -> weight reload -> rollouts (--simulated: ingest only)")
    d.add_argument("--simulated", action="store_true", help="the ingest demo instead: simulated rollouts -> Kafka -> "
                                                           "Parquet -> SQL answers (no model)")
    d.add_argument("--max-turns", type=int, default=3, help="policy turns per rollout of the main job (default 3)")
    d.add_argument("--rollout-timeout", type=float, default=300.0,
                   help="seconds a rollout of the main job may take at most (default 300)")
    d.add_argument("--max-tokens", type=int, default=96, help="tokens per policy completion in the main job (default 96: room for one tool call)")
    d.add_argument("--rollouts", type=int, default=32, help="--simulated: rollouts to simulate (default 32)")
    d.add_argument("--seed", type=int, default=0, help="--simulated: random seed (default 0)")
    d.add_argument("--port", type=int, help="broker port (default 9092, or a free one if taken)")
    d.add_argument("--keep-broker", "--keep", action="store_true",
                   help="leave the broker (and the policy server) running afterwards")
    d.set_defaults(func=cmd_demo)
