"""Where the reference agent's tool calls run, and the limits they run under.

    sb = make_sandbox("local", home / "rollouts" / rollout_id, SandboxLimits(tool_timeout_s=600), rollout_id=rid)
    sb.setup({"paper.md": paper, "addendum.md": addendum, "blacklist.txt": urls})
    res = sb.run("ls -la", timeout_s=30)          # ExecResult(output, exit_code, timed_out, n_bytes)
    sb.read_text(sb.paper_dir + "/paper.md")
    sb.close()

Kinds (`SANDBOX_KINDS`):
- `local` (default, `producers.sandbox_local.NamespaceSandbox`): the rollout in its own Linux
  namespaces (bubblewrap): nothing of the host but a read-only /usr and /etc, paper read-only,
  submission a size-capped tmpfs, no network, a PID namespace per call. Refuses to start, saying
  why, on a machine that cannot create the namespaces.
- `unsafe-local` (`SubprocessSandbox`, below): plain subprocesses of the runner's user with rlimits.
  NOT isolated: a tool call sees the host's processes, files and network, and as root it can read
  the runner's environment (API keys) and kill the runner. Only for machines without namespaces.
- `k8s` (`producers.sandbox_k8s.K8sSandbox`): one Pod per rollout, tool calls by the exec API.

Layout: `paper/` holds the task's paper, addendum and blacklist, `submission/` is the agent's
working directory and what is snapshotted for the judge.

`SubprocessSandbox` runs each command as `bash -c` in a new session (so a timeout kills the whole
process group, not just bash) under rlimits set with bash's `ulimit`: CPU seconds, address space,
file size and process count (RLIMIT_NPROC counts every process of the user and is not enforced for
root). Output (stdout and stderr together) is read through a pipe keeping only its first and last
bytes (`HeadTail`): a command that prints gigabytes costs neither memory nor disk beyond that cap. The environment is minimal: no KLONG_* settings and no API keys leak in.
"""
from __future__ import annotations

import os
import resource
import signal
import select
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional, Protocol

from schemas.errors import ConfigError
from schemas.events import path_safe_id

SandboxKind = Literal["local", "unsafe-local", "k8s"]
SANDBOX_KINDS: tuple[str, ...] = ("local", "unsafe-local", "k8s")


@dataclass(frozen=True)
class SandboxLimits:
    tool_timeout_s: float = 600.0  # wall time of one tool call (also capped by the rollout's time left)
    cpu_s: int = 3600  # RLIMIT_CPU per process
    memory_mb: int = 8192  # RLIMIT_AS per process
    file_size_mb: int = 1024  # RLIMIT_FSIZE: largest file a command may write
    max_procs: int = 512  # RLIMIT_NPROC (per user; root is exempt)
    max_output_bytes: int = 16 * 1024  # tool output shown to the model (inspect_ai's default is 16 KiB)
    disk_mb: int = 2048  # local sandbox: size of the submission/ filesystem (the disk quota)
    tmp_mb: int = 512  # local sandbox: size of the private /tmp

    def __post_init__(self) -> None:
        for name in ("tool_timeout_s", "cpu_s", "memory_mb", "file_size_mb", "max_procs", "max_output_bytes",
                     "disk_mb", "tmp_mb"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"sandbox limit {name} must be positive, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class ExecResult:
    output: str  # stdout+stderr, head and tail kept when longer than the read cap
    exit_code: Optional[int]  # None when killed by the timeout
    timed_out: bool
    n_bytes: int  # full output size before any truncation
    timeout_s: Optional[float] = None  # the wall-time limit the call ran under (the smaller of asked and tool limit)


class Sandbox(Protocol):
    paper_dir: str
    submission_dir: str
    limits: SandboxLimits

    def setup(self, paper_files: dict[str, str]) -> None: ...
    def run(self, command: str, *, timeout_s: float, stdin: Optional[str] = None) -> ExecResult: ...
    def read_text(self, path: str) -> str: ...
    def local_submission(self, scratch: Path) -> Path: ...
    def close(self) -> None: ...


class HeadTail:
    """Keeps the first and last `cap/2` bytes of a stream, whatever its length, and counts the rest:
    a tool call that prints gigabytes costs this much memory, nothing on disk."""

    def __init__(self, cap: int):
        self.cap, self.size = cap, 0
        self.head, self.tail = bytearray(), bytearray()

    def add(self, data: bytes) -> None:
        self.size += len(data)
        room = self.cap // 2 - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        self.tail += data
        keep = self.cap - self.cap // 2
        if len(self.tail) > 2 * keep:  # trim in batches: amortised O(1) per byte
            del self.tail[:-keep]

    def text(self) -> str:
        """The whole stream when <= cap bytes, else its head, a marker and its tail (cap/2 bytes each)."""
        if self.size <= self.cap:
            data = bytes(self.head + self.tail)
        else:
            data = (bytes(self.head) + f"\n[... {self.size - self.cap} bytes omitted ...]\n".encode()
                    + bytes(self.tail[-(self.cap // 2):]))
        return data.decode("utf-8", errors="replace")


def ulimit_flags(lim: SandboxLimits) -> str:
    """bash `ulimit` flags for the limits. Set by the launching bash, not a preexec_fn: preexec_fn
    can deadlock the child when many rollout threads fork at once. A limit above the current hard
    limit is lowered to it (raising a hard limit needs privileges)."""
    flags = []
    for flag, res, value, unit in (("-t", resource.RLIMIT_CPU, lim.cpu_s, 1),
                                   ("-v", resource.RLIMIT_AS, lim.memory_mb, 1024),
                                   ("-f", resource.RLIMIT_FSIZE, lim.file_size_mb, 1024),
                                   ("-u", resource.RLIMIT_NPROC, lim.max_procs, 1)):
        value *= unit  # bash's units: seconds, KiB, KiB, processes
        hard = resource.getrlimit(res)[1]
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard // (1024 if unit == 1024 else 1))
        flags.append(f"{flag} {value}")
    return " ".join(flags)


def prlimit_args(lim: SandboxLimits) -> list[str]:
    """The same limits as `ulimit_flags`, as util-linux `prlimit` options (soft = hard, base units): one
    small exec in front of the command instead of a launching shell."""
    out = []
    for opt, res, value in (("--cpu", resource.RLIMIT_CPU, lim.cpu_s), ("--as", resource.RLIMIT_AS, lim.memory_mb << 20),
                            ("--fsize", resource.RLIMIT_FSIZE, lim.file_size_mb << 20),
                            ("--nproc", resource.RLIMIT_NPROC, lim.max_procs)):
        hard = resource.getrlimit(res)[1]
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        out.append(f"{opt}={value}")
    return out


def run_capped(argv: list[str], *, env: dict[str, str], stdin: Optional[str], timeout_s: float, cap: int,
               kill: Callable[[subprocess.Popen], None], cwd: Optional[str] = None,
               pass_fds: tuple[int, ...] = ()) -> tuple[str, int, Optional[int], bool]:
    """Runs `argv` in a new session, stdout and stderr read through a pipe into a `HeadTail(cap)`, `stdin` fed
    as text; past `timeout_s` `kill(proc)` ends it. (text, full output size, exit code or None when killed by
    the timeout, timed out). Returns when the process exits, even if a child it left behind still holds the
    pipe open (`server &`): what is in the pipe by then is read, the rest is not waited for."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            pass_fds=pass_fds)
    if stdin is not None:
        threading.Thread(target=_feed, args=(proc.stdin, stdin.encode()), daemon=True).start()
    out, fd = HeadTail(cap), proc.stdout.fileno()
    os.set_blocking(fd, False)
    try:
        exited = os.pidfd_open(proc.pid)  # readable once the process exits
    except (AttributeError, OSError):
        exited = None
    deadline = time.monotonic() + timeout_s
    pipe_open, timed_out = True, False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            watch = ([fd] if pipe_open else []) + ([exited] if exited is not None else [])
            ready = select.select(watch, [], [], left if exited is not None else min(left, 0.05))[0]
            if fd in ready:
                pipe_open = _drain(fd, out)
            if (exited in ready) if exited is not None else proc.poll() is not None:
                if pipe_open:
                    _drain(fd, out)
                break
        if timed_out:
            kill(proc)
        code = proc.wait()
    finally:
        proc.stdout.close()
        if exited is not None:
            os.close(exited)
    return out.text(), out.size, None if timed_out else code, timed_out


def _feed(pipe, data: bytes) -> None:
    try:
        pipe.write(data)
        pipe.close()
    except (BrokenPipeError, OSError, ValueError):
        pass


def _drain(fd: int, out: HeadTail) -> bool:
    """Reads what the pipe holds now; False at end of file."""
    while True:
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return True
        if not data:
            return False
        out.add(data)


class SubprocessSandbox:
    """`--sandbox unsafe-local`: a working directory on this machine; commands run as rlimited
    subprocesses of the runner's user, unisolated (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, limits: SandboxLimits = SandboxLimits(), *, python: str = "python3"):
        self.root = Path(root).resolve()
        self.limits, self.python = limits, python
        self.paper_dir = str(self.root / "paper")
        self.submission_dir = str(self.root / "submission")
        self._scratch = self.root / ".sandbox"

    def setup(self, paper_files: dict[str, str]) -> None:
        for d in (self.paper_dir, self.submission_dir, self._scratch / "tmp"):
            Path(d).mkdir(parents=True, exist_ok=True)
        for name, text in paper_files.items():
            (Path(self.paper_dir) / name).write_text(text, encoding="utf-8")

    def _env(self) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "HOME": str(self.root),
                "TMPDIR": str(self._scratch / "tmp"), "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1",
                "PAPER_DIR": self.paper_dir, "SUBMISSION_DIR": self.submission_dir}

    def run(self, command: str, *, timeout_s: float, stdin: Optional[str] = None) -> ExecResult:
        self._scratch.mkdir(parents=True, exist_ok=True)
        limit = max(0.05, min(timeout_s, self.limits.tool_timeout_s))
        launcher = f'ulimit {ulimit_flags(self.limits)} || exit 126; exec bash -c "$1"'
        text, size, code, timed_out = run_capped(["bash", "-c", launcher, "klong-sandbox", command], env=self._env(),
                                                 stdin=stdin, timeout_s=limit, cap=4 * self.limits.max_output_bytes,
                                                 kill=self._kill, cwd=self.submission_dir)
        return ExecResult(text, code, timed_out, size, limit)

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        """The whole session: `sleep 100 &` children of bash die too."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def read_text(self, path: str) -> str:
        p = Path(path) if os.path.isabs(path) else Path(self.submission_dir) / path
        return p.read_text(encoding="utf-8", errors="replace")

    def local_submission(self, scratch: Path) -> Path:
        """A local directory with the submission's files (for the snapshot): here, the directory itself."""
        return Path(self.submission_dir)

    def close(self) -> None:
        """The directory stays: it is the rollout's record of what the agent built."""




def make_sandbox(kind: str, parent: str | os.PathLike, limits: SandboxLimits = SandboxLimits(), *, rollout_id: str,
                 python: str = "python3", k8s_image: str = "python:3.11-slim", k8s_namespace: str = "default",
                 env: Optional[dict[str, str]] = None, allow_hosts: tuple[str, ...] = ()) -> Sandbox:
    """The sandbox of one rollout, in `parent/<rollout_id>` on this machine (`local`, `unsafe-local`)
    or a Pod (`k8s`). The rollout id must be able to name a directory (no `/`, no `..`). `allow_hosts`
    (local only; checked with producers.sandbox_net.allowed_hosts): HTTP(S) to those hosts, nothing else."""
    path_safe_id(rollout_id, "rollout id")
    if allow_hosts and kind != "local":
        raise ConfigError(f"a network allowlist needs --sandbox local (the {kind} sandbox cannot enforce one)")
    if kind == "local":
        from producers.sandbox_local import NamespaceSandbox

        return NamespaceSandbox(Path(parent) / rollout_id, limits, python=python, env=env, allow_hosts=allow_hosts)
    if kind == "unsafe-local":
        return SubprocessSandbox(Path(parent) / rollout_id, limits, python=python)
    if kind == "k8s":
        from producers.sandbox_k8s import K8sSandbox

        return K8sSandbox(rollout_id, limits, image=k8s_image, namespace=k8s_namespace)
    raise ConfigError(f"sandbox must be one of {', '.join(SANDBOX_KINDS)}, got {kind!r}")


def __getattr__(name: str):
    """`render_pod_manifest` / `K8sSandbox` moved to producers.sandbox_k8s; old imports keep working."""
    if name in ("render_pod_manifest", "K8sSandbox"):
        from producers import sandbox_k8s

        return getattr(sandbox_k8s, name)
    raise AttributeError(name)
