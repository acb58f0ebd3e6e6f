"""The isolated local sandbox (the default): each rollout in its own Linux namespaces, by bubblewrap.

    sb = NamespaceSandbox(home / "rollouts" / rollout_id, SandboxLimits(disk_mb=1024))
    sb.setup({"paper.md": paper})                  # starts the rollout's holder namespace
    sb.run("ls /home/paper", timeout_s=30)         # ExecResult; a fresh PID namespace per call
    sb.close()                                     # kills everything, copies submission/ out to the host
    run_in_sandbox("/tmp/sub", "pytest -q", timeout_s=60)   # one command over a directory (graders)

How: per rollout one *holder* (`bwrap ... sleep infinity`, run as an unprivileged uid via `setpriv`
when we are root) owns new user, mount, network, IPC, UTS and cgroup namespaces. Inside it: uid 0
(mapped to the unprivileged uid outside: root inside, nobody outside, so /etc/shadow and other
root-only files stay closed), a read-only /usr and /etc, `/home/paper` (the task's files, read-only),
`/home/submission` (a tmpfs of `disk_mb`: the disk quota, writes past it fail with ENOSPC), a
private `/tmp` (tmpfs of `tmp_mb`), no data home, no other rollout, no host path at all beyond
/usr and /etc, and only a loopback network (with `allow_hosts`, HTTP(S) to those hosts only, through
the proxy of `producers.sandbox_net`). The root, /dev and /home are read-only; the only writable
places are submission/, /tmp and /dev/shm, each a tmpfs with a size (the quota).

Each tool call enters those namespaces (`nsenter`, the holder's PID namespace included) and starts
a nested `bwrap` there: its own PID namespace with its own /proc, every capability dropped
(`--cap-drop ALL`; CapEff 0 though it is uid 0 inside), no_new_privs, and the seccomp filter of
`producers.sandbox_seccomp` (no mount/umount, setns, unshare, ptrace, keyctl, bpf, ...). So a call
sees only its own processes, cannot signal the runner, cannot change the rollout's mounts (which the
next call and the copy-out would meet) nor enter another namespace, and when it ends (or times out)
the kernel kills every process it left behind (`setsid sleep &` included). The environment is
empty but for PATH, HOME, TMPDIR, LANG and PAPER_DIR/SUBMISSION_DIR (plus `env`), rlimits as in
`SandboxLimits` (RLIMIT_NPROC binds here: root inside a user namespace is not exempt). A call's
output comes back through a pipe, capped in memory (`producers.sandbox.HeadTail`).

The submission lives in the holder's tmpfs (memory, swappable) while the rollout runs; `close()`
and `local_submission()` copy it out from the host side, through the holder's mounts
(`/proc/<holder>/root`), with no-follow opens and bounds (`producers.sandbox_copy`): no program of the
sandbox runs for it and no archive the agent could shape is extracted. Not isolated: CPU time and
memory share the machine (rlimits per process, no cgroup), the kernel is shared (a kernel exploit
escapes), /usr and /etc are readable. The bwrap command line, the seccomp pipe and the process-tree kill
are producers.sandbox_bwrap.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
from pathlib import Path
from typing import Optional

from producers.sandbox import ExecResult, SandboxLimits, prlimit_args, run_capped
from producers.sandbox_bwrap import _TOOLS, _bwrap_base, _drop_privileges, _kill_group, _seccomp_fd
from producers.sandbox_copy import CopyBounds, CopyReport, copy_tree_nofollow, open_nofollow
from producers.sandbox_seccomp import seccomp_problem
from schemas.errors import ConfigError, TransientError

log = logging.getLogger("klong.sandbox")

PAPER_DIR, SUBMISSION_DIR = "/home/paper", "/home/submission"
READ_TEXT_CAP = 32 * 1024 * 1024  # read_file_chunk / search_file read at most this much of a file


@functools.lru_cache(maxsize=1)
def isolation_problem() -> Optional[str]:
    """None when this machine can build the sandbox, else why not (checked once per process)."""
    problem = seccomp_problem()
    if problem:
        return problem
    missing = [t for t in _TOOLS if shutil.which(t) is None and not (t == "setpriv" and os.geteuid() != 0)]
    if missing:
        return f"{', '.join(missing)} not found (Debian: apt-get install bubblewrap util-linux)"
    try:
        r = subprocess.run(_drop_privileges() + _bwrap_base() + ["--", "true"], capture_output=True, text=True,
                           timeout=60, env={"PATH": "/usr/bin:/bin"})
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"bwrap did not run ({e})"
    if r.returncode != 0:
        return (f"bwrap cannot create namespaces here ({r.stderr.strip()[:300] or r.returncode}); "
                "unprivileged user namespaces may be disabled (sysctl kernel.unprivileged_userns_clone, "
                "user.max_user_namespaces) or a container forbids them")
    return None


def require_isolation() -> None:
    problem = isolation_problem()
    if problem:
        raise ConfigError(f"the local sandbox cannot isolate tool calls on this machine: {problem}. "
                          "Fix that, use --sandbox k8s, or accept running tools unisolated as root with "
                          "--sandbox unsafe-local")


class NamespaceSandbox:
    """One rollout's namespaces (see the module docstring). `root` on the host keeps `paper/` and,
    after close(), `submission/`; nothing of it is visible inside except through copies."""

    def __init__(self, root: str | os.PathLike, limits: SandboxLimits = SandboxLimits(), *, python: str = "python3",
                 env: Optional[dict[str, str]] = None, copy_out: bool = True, allow_hosts: tuple[str, ...] = ()):
        require_isolation()  # before anything is recorded: refuse, saying why
        self.root = Path(root).resolve()
        self.limits, self.python, self.copy_out = limits, python, copy_out
        self.paper_dir, self.submission_dir = PAPER_DIR, SUBMISSION_DIR
        self._extra_env = dict(env or {})
        self.allow_hosts = tuple(allow_hosts)  # checked against the task's blacklist: sandbox_net.allowed_hosts
        self._proxy = None
        self._scratch = self.root / ".sandbox"
        self._holder: Optional[subprocess.Popen] = None
        self._pid: Optional[int] = None  # the holder's process inside the namespaces (nsenter target)
        self._lock = threading.Lock()
        self.last_copy: Optional[CopyReport] = None  # what the last copy-out kept and left behind

    # ---- lifecycle -----------------------------------------------------------------------------------

    def setup(self, paper_files: dict[str, str], submission_from: Optional[str | os.PathLike] = None) -> None:
        """Starts the holder with the paper files (read-only) and copies `submission_from` (default: a
        `submission/` the host root already has, e.g. a resumed rollout) into the submission tmpfs."""
        paper = self.root / "paper"
        for d in (paper, self._scratch):
            d.mkdir(parents=True, exist_ok=True)
        for name, text in paper_files.items():
            (paper / name).write_text(text, encoding="utf-8")
        fds = [os.open(p, os.O_RDONLY) for p in sorted(paper.iterdir()) if p.is_file()]
        info_r, info_w = os.pipe()
        try:
            cmd = _drop_privileges() + _bwrap_base() + ["--tmpfs", "/home", "--dir", PAPER_DIR]
            for fd, p in zip(fds, sorted(p for p in paper.iterdir() if p.is_file())):
                cmd += ["--ro-bind-data", str(fd), f"{PAPER_DIR}/{p.name}"]
            cmd += ["--size", str(self.limits.disk_mb << 20), "--tmpfs", SUBMISSION_DIR,
                    "--size", str(self.limits.tmp_mb << 20), "--tmpfs", "/tmp",
                    "--size", str(self.limits.tmp_mb << 20), "--tmpfs", "/dev/shm"]
            if self.allow_hosts:  # the holder is the forwarder to the allowlist proxy (producers.sandbox_net)
                from producers.sandbox_net import AllowlistProxy

                self._proxy = AllowlistProxy(self.allow_hosts)
                cmd += ["--bind", self._proxy.path, "/run/klong/proxy.sock"]
            # Last, after every mount: nothing else is writable (bwrap's root and /dev are tmpfs
            # without a size otherwise: half the host's memory each).
            cmd += ["--remount-ro", "/home", "--remount-ro", "/dev", "--remount-ro", "/",
                    "--chdir", SUBMISSION_DIR, "--info-fd", str(info_w), "--"]
            if self.allow_hosts:
                from producers.sandbox_net import FORWARDER, PROXY_PORT

                cmd += ["python3", "-c", FORWARDER, "/run/klong/proxy.sock", str(PROXY_PORT)]
            else:
                cmd += ["sh", "-c", "echo ready && exec sleep infinity"]
            self._holder = subprocess.Popen(cmd, pass_fds=fds + [info_w], stdin=subprocess.DEVNULL,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            env={"PATH": "/usr/bin:/bin"}, start_new_session=True)
        finally:
            for fd in fds + [info_w]:
                os.close(fd)
        with os.fdopen(info_r, "rb") as f:
            info = f.read()  # bwrap closes the fd once the namespaces stand (EOF), or dies
        try:
            self._pid = json.loads(info)["child-pid"]
            # The namespaces exist when the info arrives; the mounts once the holder's command runs.
            if self._holder.stdout.readline() != b"ready\n":
                raise ValueError("the holder exited during setup")
        except (ValueError, KeyError):
            err = self._holder.stderr.read().decode(errors="replace").strip() if self._holder.poll() is not None else ""
            self.close()
            raise TransientError(f"sandbox for {self.root.name} did not start: {err or 'no namespace info'}")
        src = Path(submission_from) if submission_from is not None else self.root / "submission"
        if src.is_dir():
            self._copy_in(src)

    def close(self) -> None:
        """Copies the submission out to `root/submission` (the rollout's record), then kills the holder
        and with it every process of the sandbox."""
        with self._lock:
            holder, self._holder = self._holder, None
        if holder is None:
            return
        try:
            if self.copy_out and self._pid is not None and holder.poll() is None:
                dest = self.root / "submission"
                tmp = self.root / ".submission.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                self._copy_out(tmp)
                shutil.rmtree(dest, ignore_errors=True)
                tmp.rename(dest)
        finally:
            _kill_group(holder)
            self._pid = None
            if self._proxy is not None:
                self._proxy.close()
                self._proxy = None

    def __enter__(self) -> "NamespaceSandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- running ---------------------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        from producers.sandbox_net import proxy_env

        return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8",
                "PYTHONUNBUFFERED": "1", "PAPER_DIR": PAPER_DIR, "SUBMISSION_DIR": SUBMISSION_DIR,
                **proxy_env(self.allow_hosts), **self._extra_env}

    def _enter(self, argv: list[str], seccomp_fd: int) -> list[str]:
        """argv run inside the rollout's namespaces, in a new PID namespace of its own, with no
        capabilities and the seccomp filter read from `seccomp_fd` (module docstring)."""
        if self._pid is None:
            raise TransientError("the sandbox is not running (setup() first, or it was closed)")
        # --as-pid-1: the command is its namespace's init, so `pkill -f python` inside cannot kill the
        # call's own shell (init ignores signals it has no handler for), and when it exits the kernel
        # kills whatever it left behind.
        return (["nsenter", "-t", str(self._pid), "--user", "--mount", "--net", "--ipc", "--uts", "--cgroup", "--pid",
                 "--", "bwrap", "--unshare-pid", "--as-pid-1", "--die-with-parent", "--dev-bind", "/", "/", "--proc", "/proc",
                 "--cap-drop", "ALL", "--seccomp", str(seccomp_fd), "--chdir", SUBMISSION_DIR, "--"] + argv)

    def run(self, command: str, *, timeout_s: float, stdin: Optional[str] = None) -> ExecResult:
        limit = max(0.05, min(timeout_s, self.limits.tool_timeout_s))
        text, size, code, timed_out = self._run(command, limit, stdin, 4 * self.limits.max_output_bytes)
        return ExecResult(text, code, timed_out, size, limit)

    def _run(self, command: str, timeout_s: float, stdin: Optional[str], cap: int) -> tuple[str, int, Optional[int], bool]:
        """(output, its full size, exit code or None when killed by the timeout, timed out)."""
        argv = ["prlimit", *prlimit_args(self.limits), "--", "bash", "-c", command]
        with _seccomp_fd() as fd:
            return run_capped(self._enter(argv, fd), env=self._env(),
                              stdin=stdin, timeout_s=timeout_s, cap=cap, kill=_kill_group, pass_fds=(fd,))

    def read_text(self, path: str) -> str:
        """A file as the sandbox sees it (read inside it: a symlink cannot point the runner elsewhere)."""
        quoted = "'" + path.replace("'", "'\\''") + "'"
        text, _, code, timed_out = self._run(f"cat -- {quoted}", 60, None, READ_TEXT_CAP)
        if code != 0 or timed_out:
            raise (IsADirectoryError if "Is a directory" in text else FileNotFoundError)(path)
        return text

    # ---- the submission across the namespace boundary ----------------------------------------------------

    def _copy_in(self, src: Path) -> None:
        """The host's copy of a submission (written by `_copy_out`, so no link in it leads out) into the
        sandbox, extracted by the system's tar there: at setup, before any tool call ran."""
        with _seccomp_fd() as fd:
            proc = subprocess.Popen(self._enter(["tar", "-x", "-C", SUBMISSION_DIR, "--no-same-owner", "-f", "-"], fd),
                                    env=self._env(), stdin=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(fd,))
        try:
            with tarfile.open(fileobj=proc.stdin, mode="w|") as tar:
                for p in sorted(src.iterdir()):
                    tar.add(p, arcname=p.name)
        finally:
            proc.stdin.close()
        if proc.wait() != 0:
            raise TransientError(f"copying {src} into the sandbox failed: {proc.stderr.read().decode()[:300]}")

    def _copy_out(self, dest: Path) -> Path:
        """The submission into `dest` (a new directory), read by the runner through the holder's mounts
        with no-follow opens (producers.sandbox_copy): nothing of the sandbox runs for it."""
        if self._pid is None:
            raise TransientError("the sandbox is not running (setup() first, or it was closed)")
        dest.parent.mkdir(parents=True, exist_ok=True)
        src = open_nofollow(f"/proc/{self._pid}/root", SUBMISSION_DIR)
        try:
            report = copy_tree_nofollow(src, dest, CopyBounds(max_bytes=self.limits.disk_mb << 20))
        finally:
            os.close(src)
        self.last_copy = report
        if report.n_skipped:
            log.warning("sandbox %s: %d entries of submission/ not copied out, e.g. %s", self.root.name,
                        report.n_skipped, "; ".join(f"{p}: {why}" for p, why in report.skipped[:3]))
        return dest

    def local_submission(self, scratch: Path) -> Path:
        """A copy of the submission on the host (for the snapshot), in `scratch/submission`."""
        return self._copy_out(Path(scratch) / "submission")


def run_in_sandbox(directory: str | os.PathLike, command: str, *, timeout_s: float,
                   limits: SandboxLimits = SandboxLimits(), paper_files: Optional[dict[str, str]] = None,
                   env: Optional[dict[str, str]] = None) -> ExecResult:
    """Runs one command in a fresh sandbox over a copy of `directory` (at /home/submission, the working
    directory; writes stay inside and are thrown away). For graders running a command on a submission."""
    if timeout_s > limits.tool_timeout_s:  # the caller's timeout is the limit here, not the tool default
        limits = dataclasses.replace(limits, tool_timeout_s=timeout_s)
    with tempfile.TemporaryDirectory(prefix="klong-sandbox-") as tmp:
        with NamespaceSandbox(tmp, limits, env=env, copy_out=False) as sb:
            sb.setup(paper_files or {}, submission_from=directory)
            return sb.run(command, timeout_s=timeout_s)
