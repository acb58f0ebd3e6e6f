"""What a policy server serves and how vLLM is started: its config, its recorded state, its command line.

    cfg = ServeConfig(model="HOME/models/smollm2", device="cpu")   # cfg.check(): ConfigError naming the key
    server_command(cfg, weights=None, port=8124)                     # python -m vllm.entrypoints.openai.api_server ...
    server_env(home, cfg)                                            # every core, a small KV cache, caches under HOME

The command asks vLLM for what the agent runner needs (token ids and processed logprobs, the Hermes
tool-call parser, the model's chat template) and loads our worker extension for in-place reloads
(services.serve_worker). Starting, reloading and stopping the process is services.serve.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from schemas.errors import ConfigError, TransientError

Device = Literal["cpu", "cuda"]
DEFAULT_PORT = 8124
SERVED_NAME = "policy"
WORKER_EXTENSION = "services.serve_worker.PolicyWorkerExtension"


class ServeError(TransientError):
    """The policy server did not start, answer or reload; the message points at its log."""


@dataclass(frozen=True)
class ServeConfig:
    """How to serve a model directory (the plan's `serve:` keys)."""

    model: str  # a transformers model directory (`klong model import` writes HOME/models/NAME)
    device: Device = "cpu"
    dtype: str | None = None  # default: float32 on cpu, bfloat16 on cuda
    max_model_len: int = 4096
    port: int | None = None  # default 8124, or a free port if that one is taken
    enforce_eager: bool | None = None  # default: True on cpu (fast start), False on cuda
    kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE (cpu only)
    gpu_memory_utilization: float = 0.5  # cuda only
    served_name: str = SERVED_NAME
    tool_call_parser: str = "hermes"
    start_timeout_s: float = 900.0

    def resolved_dtype(self) -> str:
        return self.dtype or ("float32" if self.device == "cpu" else "bfloat16")

    def eager(self) -> bool:
        return self.device == "cpu" if self.enforce_eager is None else self.enforce_eager

    def check(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"serve.device: {self.device!r} is not cpu or cuda")
        model = Path(self.model)
        if not (model / "config.json").is_file():
            raise ConfigError(f"serve.model: {model} is not a transformers model directory (no config.json); "
                              "make one with `klong model import FILE.gguf --name NAME`")
        if self.max_model_len < 256:
            raise ConfigError(f"serve.max_model_len: {self.max_model_len} is too small (>= 256)")


@dataclass
class ReloadResult:
    method: Literal["reload", "restart"]  # reload: in place (vLLM pause/collective_rpc/resume)
    seconds: float
    checkpoint: str
    policy_version: int
    reason: str = ""  # why a restart ran instead of a reload


@dataclass
class ServerState:
    """What HOME/serve.json records: enough for any process to find, describe, reload or stop it."""

    pid: int
    port: int
    model: str  # the base model directory (tokenizer and chat template come from it)
    checkpoint: str  # the weights being served (the base model directory or a checkpoint)
    policy_version: int
    config: dict
    started_at: float
    last_reload: dict | None = None
    log: str = ""

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL (what `policy.base_url` takes)."""
        return f"{self.root_url}/v1"

    @property
    def served_name(self) -> str:
        return self.config.get("served_name", SERVED_NAME)


def server_env(home: Path, cfg: ServeConfig) -> dict:
    """The environment vLLM runs with (REAL-MODEL.md): every core, a small KV cache, caches under HOME."""
    env = dict(os.environ)
    env.update({"VLLM_SERVER_DEV_MODE": "1",  # /pause, /collective_rpc, /reset_prefix_cache, /resume
                "VLLM_CACHE_ROOT": str(home / "cache" / "vllm"),
                "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    if cfg.device == "cpu":
        n = os.cpu_count() or 1
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{n - 1}")  # default binds one core, idles the rest
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gib))
    return env


def server_command(cfg: ServeConfig, weights: str | None, port: int) -> list[str]:
    model = Path(cfg.model).resolve()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           "--model", str(weights or model), "--tokenizer", str(model),
           "--served-model-name", cfg.served_name, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", cfg.resolved_dtype(), "--max-model-len", str(cfg.max_model_len),
           "--enable-auto-tool-choice", "--tool-call-parser", cfg.tool_call_parser,
           "--worker-extension-cls", WORKER_EXTENSION,
           "--generation-config", "vllm",  # sampling is what each request asks, not the model's defaults
           # logprobs of the distribution sampled (after temperature), not the raw T=1 ones: the behaviour
           # logprobs the trainer compares with its own log-probs at the step's temperature
           "--logprobs-mode", "processed_logprobs",
           "--seed", "0", "--uvicorn-log-level", "warning"]
    template = model / "chat_template.jinja"
    if template.is_file():
        cmd += ["--chat-template", str(template)]
    if cfg.eager():
        cmd.append("--enforce-eager")
    if cfg.device == "cuda":
        cmd += ["--gpu-memory-utilization", str(cfg.gpu_memory_utilization)]
    return cmd
