"""`klong rollout run`: one rollout of the reference agent (PaperBench basic agent + KLong scaffold)
on a registered task, against any OpenAI-compatible policy endpoint, recorded as events.

    klong rollout run --task fre --base-url http://gpu-1:8000/v1 --model klong-policy --timeout 7200
    klong rollout run --task fre --sandbox k8s --dry-run          # print the sandbox Pod manifest
    klong sink run --until-idle && klong sql "SELECT * FROM rollouts"

The policy URL and model fall back to `KLONG_POLICY_BASE_URL` / `KLONG_POLICY_MODEL`; the API key is
read from `OPENAI_API_KEY` (none needed for vLLM) and never printed. Tool calls run in a sandbox:
`local` (default: the rollout in its own Linux namespaces, see README "What the sandbox isolates";
paper and submission kept in HOME/rollouts/<rollout_id>/), `unsafe-local` (plain rlimited
subprocesses, NOT isolated) or `k8s` (one Pod per rollout, commands by the exec API; NOT tested
against a real cluster here: only `--dry-run`, which prints the manifests, is). Events go through an outbox under HOME/outbox/agent-N
(the first free slot); run `klong sink run` to archive them.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from core.procs import signals_to
from schemas.errors import ConfigError


def _settings(args):
    from core.settings import Settings

    return Settings.load(args.home, args.bootstrap_servers, args.topic_prefix)


def _config(args):
    from producers.agent import AgentConfig
    from producers.sandbox import SandboxLimits

    try:
        limits = SandboxLimits(tool_timeout_s=args.tool_timeout, cpu_s=args.cpu_s, memory_mb=args.memory_mb,
                               file_size_mb=args.file_size_mb, max_procs=args.max_procs,
                               max_output_bytes=args.max_output_bytes, disk_mb=args.disk_mb, tmp_mb=args.tmp_mb)
        return AgentConfig(min_time_fraction=args.min_time_fraction, reminder_every_turns=args.reminder_every,
                           sandbox=args.sandbox, limits=limits, workdir=args.workdir, allow_hosts=tuple(args.allow_host),
                           request_token_ids=not args.no_token_ids, k8s_image=args.k8s_image,
                           k8s_namespace=args.k8s_namespace, temperature=args.temperature, max_tokens=args.max_tokens,
                           snapshot_every_turns=args.snapshot_every, model_dir=_model_dir(args))
    except ConfigError:
        raise
    except Exception as e:  # AgentConfig names the bad key
        raise ConfigError(str(e)) from e


def _model_dir(args) -> str | None:
    """--model-dir (a directory, or a NAME under HOME/models), for token-in/token-out."""
    if not args.model_dir:
        return None
    from core.settings import Settings
    from trainer.model_import import resolve_model_dir

    return str(resolve_model_dir(args.model_dir, Settings.load(args.home).home))


def _outbox(s):
    """The first free outbox slot: concurrent `rollout run`s on one home each take their own, and a
    slot left with unsent events (Kafka was down) is sent by the next run that takes it."""
    from producers.outbox import Outbox

    for n in range(64):
        try:
            return Outbox(s, s.outbox_dir / f"agent-{n}", retain="acked")
        except ConfigError as e:
            if "in use" not in str(e):
                raise
    raise ConfigError(f"all 64 agent outbox slots under {s.outbox_dir} are in use")


def cmd_run(args) -> int:
    import yaml

    from producers.agent import PolicyEndpoint, RolloutControl, run_agent
    from producers.sandbox_k8s import render_manifests
    from schemas.events import path_safe_id, uuid7

    config = _config(args)
    if args.rollout_id is not None:
        path_safe_id(args.rollout_id, "--rollout-id")
    if args.dry_run:
        if args.sandbox != "k8s":
            raise ConfigError("--dry-run prints the Pod manifest of --sandbox k8s")
        print(yaml.safe_dump_all(render_manifests(args.rollout_id or uuid7(), config.limits, image=args.k8s_image,
                                                  namespace=args.k8s_namespace), sort_keys=False), end="")
        return 0
    if args.timeout is None and os.environ.get("KLONG_ROLLOUT_TIMEOUT"):
        try:
            args.timeout = float(os.environ["KLONG_ROLLOUT_TIMEOUT"])
        except ValueError:
            raise ConfigError(f"KLONG_ROLLOUT_TIMEOUT must be seconds, got {os.environ['KLONG_ROLLOUT_TIMEOUT']!r}")
    if args.timeout is None or args.timeout <= 0:
        raise ConfigError("--timeout must be a positive number of seconds (env KLONG_ROLLOUT_TIMEOUT)")
    url = args.base_url or os.environ.get("KLONG_POLICY_BASE_URL")
    model = args.model or os.environ.get("KLONG_POLICY_MODEL")
    if not url or not model:
        raise ConfigError("--base-url and --model are required (or KLONG_POLICY_BASE_URL / KLONG_POLICY_MODEL)")
    if not args.quiet:
        logging.getLogger("klong.agent").setLevel(logging.INFO)  # one line per turn: long work shows progress
    s = _settings(args)
    policy = PolicyEndpoint(url, model, api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"),
                            request_timeout_s=args.request_timeout)
    control = RolloutControl(iteration=args.iteration, policy_version=args.policy_version, stage=args.stage)

    def on_signal(signum, _frame):  # Ctrl-C / SIGTERM: end 'aborted' after the current call, recorded
        print(f"{signal.Signals(signum).name}: stopping the rollout after the current call", file=sys.stderr)
        control.stop()

    outbox = _outbox(s)
    try:
        with signals_to(on_signal):
            res = run_agent(outbox, s, args.task, policy, timeout_s=args.timeout, group_id=args.group or uuid7(),
                            stage=args.stage, iteration=args.iteration, policy_version=args.policy_version,
                            rollout_id=args.rollout_id, control=control, config=config, judge=not args.no_judge)
        outbox.flush(timeout=60, until="acked")
    finally:
        outbox.close()
    print(f"rollout {res.rollout_id}: {res.status}, {res.n_steps} steps, {res.n_turns} turns, {res.elapsed_s:.1f} s"
          + (f", {res.n_prunes} context prunes" if res.n_prunes else "")
          + (f", snapshot {res.snapshot_ref}" if res.snapshot_ref else "")
          + (f", judge request {res.judge_request_id}" if res.judge_request_id else ""))
    if res.error:
        print(f"error: {res.error}")
    print("archive it with `klong sink run --until-idle`")
    return 0 if res.status in ("finished", "timeout") else 1


def cmd_worker(args) -> int:
    import threading

    from producers.rollout_worker import RolloutWorker

    if args.max_rollouts < 1:
        raise ConfigError(f"--max-rollouts must be >= 1, got {args.max_rollouts}")
    if not args.quiet:  # a line per rollout started / resumed (the root logger shows WARNING and up)
        logging.getLogger("klong.fleet").setLevel(logging.INFO)
    stop = threading.Event()

    def on_signal(signum, _frame):  # SIGTERM (Kubernetes), Ctrl-C: hand running rollouts over, then exit
        print(f"{signal.Signals(signum).name}: handing running rollouts over to the other workers", file=sys.stderr)
        stop.set()

    worker = RolloutWorker(_settings(args), max_rollouts=args.max_rollouts, worker_id=args.worker_id,
                           say=lambda line: print(line, file=sys.stderr, flush=True))
    with signals_to(on_signal):
        stats = worker.run(should_stop=stop.is_set)
    print(f"worker {worker.worker_id}: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
    return 0


WORKER_DOC = """`klong rollout worker`: one process of the rollout fleet. Workers consume rollout requests
(`klong rl run --fleet` / `--workers N` publishes them to <prefix>.rollout.requests) as one Kafka
consumer group, run each with the reference agent (a sandbox per rollout, steps recorded as by
`klong rollout run`) and report the end on <prefix>.rollout.results. Start as many as you like, on any
machine that reaches Kafka and the data home (a shared volume: blobs, archive):

    klong rollout worker --max-rollouts 64
    klong rollout worker --max-rollouts 64 --quiet       # no line per rollout started / resumed
    nice -n 10 klong rollout worker --max-rollouts 500   # beside the sink: the sink comes first for the CPU

Sizing: rollouts run as threads (each waits on the policy server or a tool call) and a worker's Python
uses one core at a time, so run about one worker per core with --max-rollouts = rollouts in flight /
workers (two workers of 505 held 1,000 in flight on 2 cores). On cores shared with the sink and broker,
run workers under `nice` so the archive stays fresh.

A worker that dies mid-rollout (kill -9, a lost node): its requests go to the other workers, which
resume its rollouts from their recorded steps (the same context, the next step_idx) or end them
`error` with the reason. SIGTERM / Ctrl-C hands running rollouts over the same way, then exits.
The policy's API key is read from the variable the plan names (policy.api_key_env) on each worker.
Kubernetes: `klong rollout deployment` prints a worker Deployment manifest.
"""


def cmd_deployment(args) -> int:
    import yaml

    from producers.fleet_k8s import worker_deployment

    print(yaml.safe_dump(worker_deployment(image=args.image, replicas=args.replicas, namespace=args.namespace,
                                           max_rollouts=args.max_rollouts, data_claim=args.data_claim,
                                           bootstrap_servers=args.bootstrap_servers or "kafka:9092",
                                           topic_prefix=args.topic_prefix or "klong"), sort_keys=False), end="")
    return 0


def register(sub, common) -> None:
    r = sub.add_parser("rollout", parents=[common], help="run the reference agent on a task (records a rollout)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    rsub = r.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = rsub.add_parser("run", parents=[common], help="one rollout of the basic agent against a policy endpoint",
                          description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    env = os.environ.get
    run.add_argument("--task", required=True, help="registered task id (`klong tasks list`)")
    run.add_argument("--base-url", help="OpenAI-compatible policy endpoint, e.g. http://host:8000/v1 "
                                        "(env KLONG_POLICY_BASE_URL)")
    run.add_argument("--model", help="model name served there (env KLONG_POLICY_MODEL)")
    run.add_argument("--timeout", type=float,
                     help="rollout wall time in seconds; the rollout ends 'timeout' there, steps kept "
                          "(env KLONG_ROLLOUT_TIMEOUT)")
    run.add_argument("--group", help="group id shared by the n rollouts of one sample (default: a new one)")
    run.add_argument("--rollout-id", help="rollout id (default: a new UUIDv7)")
    run.add_argument("--stage", type=int, default=1, help="progressive-RL stage m (default 1)")
    run.add_argument("--iteration", type=int, default=0, help="RL iteration (default 0)")
    run.add_argument("--policy-version", type=int, default=0, help="policy version sampled from (default 0)")
    run.add_argument("--min-time-fraction", type=float, default=0.5,
                     help="end_task is refused before this fraction of --timeout (default 0.5)")
    run.add_argument("--reminder-every", type=int, default=5, help="time reminder every N turns (0: never; default 5)")
    run.add_argument("--snapshot-every", type=int, default=0, help="extra submission snapshots every N turns "
                                                                   "(default 0: only at the end)")
    run.add_argument("--request-timeout", type=float, default=600.0, help="seconds per policy call (default 600)")
    run.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the policy (default 1.0)")
    run.add_argument("--max-tokens", type=int, help="completion tokens per policy call (default: the server's)")
    run.add_argument("--model-dir", default=env("KLONG_POLICY_MODEL_DIR", None), metavar="DIR|NAME",
                     help="the policy's model directory (or NAME under HOME/models; env KLONG_POLICY_MODEL_DIR): "
                          "token-in/token-out through vLLM's /v1/completions, every step's exact ids recorded "
                          "(default: the chat API, observation steps text-only)")
    run.add_argument("--no-token-ids", action="store_true", help="do not ask for vLLM's token-id extras "
                     "(needed for endpoints that reject unknown parameters; steps are then text-only)")
    run.add_argument("--no-judge", action="store_true", help="snapshot the submission but request no judgment")
    run.add_argument("--sandbox", choices=["local", "unsafe-local", "k8s"], default=env("KLONG_SANDBOX", "local"),
                     help="where tool calls run (env KLONG_SANDBOX; default local: the rollout in its own Linux "
                          "namespaces, no network, no host files but /usr and /etc; refused where the machine "
                          "cannot isolate). unsafe-local: plain subprocesses, NOT isolated. k8s: one Pod per "
                          "rollout via the Kubernetes exec API, untested against a real cluster here")
    run.add_argument("--allow-host", action="append", default=[], metavar="HOST",
                     help="local sandbox: let tool calls reach this host (and its subdomains) over HTTP(S) through a "
                          "proxy; repeatable; a host of the task's blacklist is refused (default: no network)")
    run.add_argument("--dry-run", action="store_true",
                     help="with --sandbox k8s: print the ConfigMap, NetworkPolicy and Pod manifests, run nothing")
    run.add_argument("--workdir", help="parent of the per-rollout sandbox dirs (default HOME/rollouts)")
    run.add_argument("--tool-timeout", type=float, default=600.0, help="wall seconds per tool call (default 600)")
    run.add_argument("--cpu-s", type=int, default=3600, help="CPU seconds per process (RLIMIT_CPU; default 3600)")
    run.add_argument("--memory-mb", type=int, default=8192, help="address space per process (default 8192 MB)")
    run.add_argument("--file-size-mb", type=int, default=1024, help="largest file a command may write (default 1024)")
    run.add_argument("--max-procs", type=int, default=512,
                     help="RLIMIT_NPROC (local: per rollout; unsafe-local: per user, root exempt; default 512)")
    run.add_argument("--disk-mb", type=int, default=2048, help="local/k8s: size of submission/ (quota; default 2048)")
    run.add_argument("--tmp-mb", type=int, default=512, help="local/k8s: size of the private /tmp (default 512)")
    run.add_argument("--max-output-bytes", type=int, default=16384,
                     help="tool output shown to the model; longer outputs keep head and tail (default 16384)")
    run.add_argument("--k8s-image", default="python:3.11-slim", help="sandbox image for --sandbox k8s")
    run.add_argument("--k8s-namespace", default="default", help="namespace for --sandbox k8s")
    run.set_defaults(func=cmd_run)

    w = rsub.add_parser("worker", parents=[common], help="a rollout fleet worker: run requested rollouts "
                        "(consumer group; resumes the rollouts of lost workers)", description=WORKER_DOC,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    w.add_argument("--max-rollouts", type=int, default=int(os.environ.get("KLONG_WORKER_MAX_ROLLOUTS", "64")),
                   help="rollouts at once in this worker (env KLONG_WORKER_MAX_ROLLOUTS; default 64)")
    w.add_argument("--worker-id", help="name in logs and results (default: host-pid-random; must be unique)")
    w.set_defaults(func=cmd_worker)

    d = rsub.add_parser("deployment", parents=[common], help="print a Kubernetes Deployment of rollout workers "
                        "(YAML; validated offline, not applied here)", description=WORKER_DOC,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--image", required=True, help="container image with klong installed")
    d.add_argument("--replicas", type=int, default=4, help="worker pods (default 4)")
    d.add_argument("--namespace", default="default", help="namespace (default default)")
    d.add_argument("--max-rollouts", type=int, default=64, help="rollouts at once per pod (default 64)")
    d.add_argument("--data-claim", default="klong-data",
                   help="PersistentVolumeClaim (ReadWriteMany) holding the shared data home (default klong-data)")
    d.set_defaults(func=cmd_deployment)
