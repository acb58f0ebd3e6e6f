"""`klong judge run|status|request`: the rubric-tree judge worker, its queue report, and asking for a judgment.

    klong judge request --rollout R --task fre --step 412 --priority eval --snapshot runs/r/submission
    klong judge run --base-url URL --model NAME [--concurrency 16] [--until-idle]
    klong judge status [--json]

The judge's URL and model fall back to `KLONG_JUDGE_BASE_URL` / `KLONG_JUDGE_MODEL`; its API key is
read from `OPENAI_API_KEY` (none needed for vLLM) and never printed.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from schemas.errors import ConfigError


def _settings(args):
    from core.settings import Settings

    return Settings.load(args.home, args.bootstrap_servers, args.topic_prefix)


def _table(rows: list[dict], names: list[str]) -> None:
    import pyarrow as pa

    from klong.cli_output import _print_table

    _print_table(pa.Table.from_pylist(rows) if rows else pa.table({n: [] for n in names}), "table", None)


def _grader(args):
    from consumers.grading import GraderConfig

    url = args.base_url or os.environ.get("KLONG_JUDGE_BASE_URL")
    model = args.model or os.environ.get("KLONG_JUDGE_MODEL")
    if not url or not model:
        raise ConfigError("--base-url and --model are required (or KLONG_JUDGE_BASE_URL / KLONG_JUDGE_MODEL)")
    return GraderConfig(base_url=url, model=model, timeout_s=args.timeout, max_attempts=args.max_attempts)


# ---- commands ------------------------------------------------------------------------------------------


def cmd_judge_run(args) -> int:
    from consumers.judge import JudgeConfig, JudgeWorker

    s = _settings(args)
    stop = {"now": False}

    def on_signal(*_):
        if stop["now"]:
            raise KeyboardInterrupt  # a second signal: stop at once, in-flight requests are re-read next run
        stop["now"] = True

    worker = JudgeWorker(s, _grader(args), JudgeConfig(concurrency=args.concurrency, idle_s=args.idle))
    before = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        st = worker.run(until_idle=args.until_idle, should_stop=lambda: stop["now"])
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    print(f"judge: {st.results} results ({st.invalid_results} invalid), {st.leaves} leaves graded "
          f"({st.invalid_leaves} invalid), {st.skipped} already judged, {st.bad_messages} bad messages, "
          f"{st.prompt_tokens + st.completion_tokens} tokens")
    return 0


def cmd_judge_status(args) -> int:
    from store.tasks import judge_status

    report = judge_status(_settings(args))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    backlog = report["kafka_backlog"]
    print("kafka backlog (not yet judged): " + (", ".join(f"{k} {v}" for k, v in backlog.items()) if backlog
                                                 else f"unavailable ({report.get('kafka_error')})"))

    def f(v):
        return "-" if v is None else f"{v:.3g}"

    rows = [{"priority": p, "requested": r["requested"], "judged": r["judged"], "pending": r["pending"],
             "invalid_results": r["invalid_results"], "wait_p50_s": f(r["wait_p50"]), "wait_p95_s": f(r["wait_p95"]),
             "latency_p50_s": f(r["latency_p50"]), "latency_p95_s": f(r["latency_p95"]),
             "latency_p99_s": f(r["latency_p99"]), "leaves": r["leaves"], "invalid_leaves": r["invalid_leaves"]}
            for p, r in report["archive"].items()]
    print("archive (requests and results archived by the sink):")
    _table(rows, ["priority", "requested", "judged", "pending", "invalid_results", "wait_p50_s", "wait_p95_s",
                  "latency_p50_s", "latency_p95_s", "latency_p99_s", "leaves", "invalid_leaves"])
    rate = report["invalid_leaf_rate"]
    print(f"invalid-leaf rate: {'-' if rate is None else f'{rate:.2%}'}")
    return 0


def cmd_judge_request(args) -> int:
    from producers.judge_requests import check_request, request_judgment, store_snapshot
    from producers.outbox import Outbox

    s = _settings(args)
    ref = args.snapshot
    if ref and not ref.startswith("sha256:") and Path(ref).is_dir():
        ref = store_snapshot(s, ref)
    if not args.unchecked:
        check_request(s, rollout_id=args.rollout, task_id=args.task, step_idx=args.step, snapshot_ref=ref)
    with Outbox(s, s.outbox_dir / "requests") as outbox:
        rid = request_judgment(outbox, rollout_id=args.rollout, task_id=args.task, step_idx=args.step,
                               priority=args.priority, snapshot_ref=ref, request_id=args.request_id)
        outbox.flush(until="acked", timeout=args.timeout)
    print(rid)
    return 0


# ---- parser --------------------------------------------------------------------------------------------


def _model_flags(p) -> None:
    p.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://host:8000/v1 (env KLONG_JUDGE_BASE_URL)")
    p.add_argument("--model", help="model name at that endpoint (env KLONG_JUDGE_MODEL); key: env OPENAI_API_KEY")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per model call (default 300)")
    p.add_argument("--max-attempts", type=int, default=6, help="tries per call on timeouts, 429 and 5xx (default 6)")


def register(sub, common) -> None:
    j = sub.add_parser("judge", parents=[common], help="rubric-tree judge worker with an eval-first priority queue")
    jsub = j.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = jsub.add_parser("run", parents=[common], help="grade judge requests against an OpenAI-compatible model")
    _model_flags(run)
    run.add_argument("--concurrency", type=int, default=8, help="model calls in flight (default 8)")
    run.add_argument("--until-idle", action="store_true", help="exit once nothing is queued, in flight or unread")
    run.add_argument("--idle", type=float, default=1.0, help="--until-idle: seconds of quiet before exiting")
    run.set_defaults(func=cmd_judge_run)
    st = jsub.add_parser("status", parents=[common], help="queue depth per priority, latency percentiles, invalid leaves")
    st.add_argument("--json", action="store_true", help="the whole report as JSON")
    st.set_defaults(func=cmd_judge_status)
    rq = jsub.add_parser("request", parents=[common], help="ask for a judgment of one rollout step")
    rq.add_argument("--rollout", required=True, help="rollout id to judge")
    rq.add_argument("--task", required=True, help="its registered task id (the rubric to grade against)")
    rq.add_argument("--step", type=int, default=0, help="step_idx judged (default 0)")
    rq.add_argument("--priority", choices=["eval", "train"], default="train",
                    help="eval requests never wait behind train ones (default train)")
    rq.add_argument("--snapshot", help="a directory (stored as a content-addressed tar), a sha256: blob reference, "
                                       "or a path under the home; default: the rollout's latest archived snapshot")
    rq.add_argument("--request-id", help="idempotency key (default: a new UUIDv7)")
    rq.add_argument("--unchecked", action="store_true", help="send without checking that the task is registered, "
                    "the rollout archived and the snapshot there (e.g. a rollout still being recorded)")
    rq.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for Kafka to take it")
    rq.set_defaults(func=cmd_judge_request)
