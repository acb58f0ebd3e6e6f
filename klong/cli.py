"""`klong`: record agent rollouts as events, archive them, query them with SQL, build versioned datasets and train.

Every command takes `--home DIR` (env KLONG_HOME, default ./klong-data) and `--bootstrap-servers`
(env KLONG_BOOTSTRAP_SERVERS, default: the embedded broker of the home). Run `klong COMMAND --help`.
Errors are one line on stderr (exit 2); Ctrl-C stops a command with one line saying what was kept (exit 130).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys

from core.procs import signals_to
from schemas.errors import KlongError

ENV_HELP = "(env KLONG_HOME; default ./klong-data)"
EXTENSIONS = ["klong.cli_dataset", "klong.cli_tasks", "klong.cli_train", "klong.cli_rl", "klong.cli_rollout", "klong.cli_import", "klong.cli_serve",
              "klong.cli_model", "klong.cli_ui", "klong.cli_archive"]


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


# ---- output -----------------------------------------------------------------------------------------


def _progress(desc: str, unit: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(desc=desc, unit=unit, disable=quiet or not sys.stderr.isatty(), file=sys.stderr)


class StageBars:
    """Progress bars for a command with stages: `bars(stage, count)` moves the bar of `stage` to `count`,
    closing the previous stage's bar (on stderr, only on a terminal and without -q)."""

    def __init__(self, units: dict[str, str], quiet: bool):
        self.units, self.quiet = units, quiet
        self.stage, self.bar = None, None

    def __call__(self, stage: str, count: int) -> None:
        if stage != self.stage:
            self.close()
            self.stage, self.bar = stage, _progress(stage, unit=self.units.get(stage, "it"), quiet=self.quiet)
        self.bar.update(count - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.stage, self.bar = None, None


def _print_table(table, fmt: str, output: str | None) -> None:
    import pyarrow.parquet as pq

    if fmt == "parquet":
        if not output:
            raise KlongError("--format parquet needs --output FILE")
        pq.write_table(table, output)
        print(f"wrote {table.num_rows} rows to {output}")
        return
    rows = table.to_pylist()
    out = open(output, "w") if output else sys.stdout
    try:
        if fmt == "json":  # one JSON array
            out.write("[" + ",\n".join(json.dumps(r, default=_json_default) for r in rows) + "]\n")
        elif fmt == "ndjson":  # one JSON object per line
            for r in rows:
                out.write(json.dumps(r, default=_json_default) + "\n")
        elif fmt == "csv":
            import csv

            w = csv.writer(out, lineterminator="\n")  # not csv's \r\n: `$(klong sql ... --format csv)` must match
            w.writerow(table.column_names)
            for r in rows:
                w.writerow([_cell(v) for v in r.values()])
        else:
            _ascii_table(table.column_names, [[_cell(v, 60) for v in r.values()] for r in rows], out)
    finally:
        if output:
            out.close()


def _json_default(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", "backslashreplace")
    return str(v)


def _cell(v, width: int | None = None) -> str:
    if v is None:
        text = ""
    elif isinstance(v, float):
        text = f"{v:.6g}"
    elif isinstance(v, (list, dict)):
        text = json.dumps(v, default=_json_default)
    elif isinstance(v, bytes):
        text = _json_default(v)
    else:
        text = str(v)
    text = text.replace("\n", "\\n")
    return text if width is None or len(text) <= width else text[: width - 1] + "…"


def _ascii_table(names: list[str], rows: list[list[str]], out) -> None:
    widths = [max([len(n)] + [len(r[i]) for r in rows]) for i, n in enumerate(names)]
    out.write(" | ".join(n.ljust(w) for n, w in zip(names, widths)) + "\n")
    out.write("-+-".join("-" * w for w in widths) + "\n")
    for r in rows:
        out.write(" | ".join(c.ljust(w) for c, w in zip(r, widths)) + "\n")
    out.write(f"({len(rows)} row{'s' if len(rows) != 1 else ''})\n")


# ---- parser -----------------------------------------------------------------------------------------


class IntermixedParser(argparse.ArgumentParser):
    """Lets `key=value` overrides follow options (`dataset build NAME --kind rl max_tokens=4096`): plain
    argparse takes the positionals in one go and would reject the overrides after `--kind rl`."""

    _inside = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inside:  # parse_known_intermixed_args calls back here
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False



def build_parser() -> argparse.ArgumentParser:
    def add_common(parser, default):
        parser.add_argument("--home", default=default, help=f"data home {ENV_HELP}")
        parser.add_argument("--bootstrap-servers", default=default, help="Kafka servers host:port[,...] (env "
                            "KLONG_BOOTSTRAP_SERVERS; default: the embedded broker of the home)")
        parser.add_argument("--topic-prefix", default=default, help="topic name prefix (env KLONG_TOPIC_PREFIX; default klong)")
        parser.add_argument("-v", "--verbose", action="store_true", default=default or False, help="log debug details")
        parser.add_argument("-q", "--quiet", action="store_true", default=default or False, help="no progress bars")

    # Common flags work before or after the command: `klong --home H sql ...` and `klong sql ... --home H`.
    common = argparse.ArgumentParser(add_help=False)
    add_common(common, argparse.SUPPRESS)
    p = argparse.ArgumentParser(prog="klong", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(p, None)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    # Commands of the later pipeline stages live in their own modules, each with register(sub, common).
    for ext in EXTENSIONS:
        importlib.import_module(ext).register(sub, common)
    _describe_pages(p)
    return p


def _describe_pages(parser: argparse.ArgumentParser) -> None:
    """Every `klong ... --help` page gets a description: its own, else the one-line help it is listed with."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, page in action.choices.items():
                if not page.description and helps.get(name):
                    page.description = helps[name][0].upper() + helps[name][1:] + "."
                page.description = _for_users(page.description)
                _describe_pages(page)


_MODULES = r"(?:schemas|core|services|store|producers|consumers|trainer|rl|ui|klong)\.[a-z_.]+"


def _for_users(text: str | None) -> str | None:
    """A help page speaks of commands, files and settings, not of the Python modules behind them: drops
    `(ui.report)`-style references and "The library is `...`." sentences from module docstrings."""
    import re

    if not text:
        return text
    text = re.sub(rf"\s*The library is\s+`{_MODULES}`\.", "", text)
    return re.sub(rf" ?\((?:{_MODULES})(?:,\s*{_MODULES})*\)", "", text)


# Commands that only read a data home: a home that is not one is an error for them (mistyped --home),
# not an empty world. Commands that write (broker start, sink, simulate, imports, runs) create it.
READS_HOME = {"sql", "status", "archive", "lineage", "ui", "report", "replay", "dataset list", "dataset show",
              "dataset diff", "dataset export", "dataset build", "tasks list", "tasks show", "judge status",
              "rl status"}


def _reads_home(args) -> bool:
    return args.command in READS_HOME or f"{args.command} {getattr(args, 'action', '')}" in READS_HOME


def _settings_for_home_check(args):
    from core.settings import Settings

    return Settings.load(getattr(args, "home", None))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from core.settings import install_log_redaction

    install_log_redaction()  # no secret in any log line, at any level
    if not args.verbose:
        logging.getLogger("kafka").setLevel(logging.CRITICAL)
    try:
        if _reads_home(args):
            _settings_for_home_check(args).require_home()
        return args.func(args)
    except KlongError as e:
        print(f"klong {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # commands that keep partial work say what they kept before this point
        print(f"klong {args.command}: interrupted (Ctrl-C); nothing after this point was done", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # an unwritable or missing path (a home on a read-only disk...): one line naming it
        if e.filename is None:
            raise
        print(f"klong {args.command}: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
