"""The namespace sandbox's building blocks: the bwrap command line, the seccomp pipe, killing a process tree.

    cmd = _drop_privileges() + _bwrap_base() + ["--", "true"]   # setpriv (as root) + bwrap with fresh namespaces
    with _seccomp_fd() as fd: ...                                # `bwrap --seccomp FD`
    _kill_group(proc)                                            # SIGKILL the group and every descendant, then wait

The sandbox itself (one holder per rollout, a nested bwrap per call) is producers.sandbox_local. When the runner
is root, the holder runs as SANDBOX_UID (nobody): root inside the user namespace, nobody outside.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import time
from typing import Iterator

from producers.sandbox_seccomp import seccomp_program

SANDBOX_UID = 65534  # the host uid the sandbox's root maps to when the runner is root (nobody)
_TOOLS = ("bwrap", "nsenter", "prlimit", "setpriv")
_SYSTEM = [("--ro-bind", "/usr", "/usr"), ("--ro-bind", "/etc", "/etc")]
_LINKS = [("usr/bin", "/bin"), ("usr/sbin", "/sbin"), ("usr/lib", "/lib"), ("usr/lib64", "/lib64")]


def _drop_privileges() -> list[str]:
    """Run the holder as an unprivileged uid when we are root (its user namespace maps root to it)."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}", "--clear-groups", "--inh-caps=-all"]


def _bwrap_base() -> list[str]:
    cmd = ["bwrap", "--die-with-parent", "--new-session", "--unshare-all", "--uid", "0", "--gid", "0",
           "--hostname", "sandbox"]
    for flag, src, dest in _SYSTEM:
        cmd += [flag, src, dest]
    for target, link in _LINKS:
        if os.path.exists("/" + target):
            cmd += ["--symlink", target, link]
    return cmd + ["--proc", "/proc", "--dev", "/dev"]


@functools.lru_cache(maxsize=1)
def _filter() -> bytes:
    return seccomp_program()


@contextlib.contextmanager
def _seccomp_fd() -> Iterator[int]:
    """A pipe holding the seccomp program, for `bwrap --seccomp FD` (the program is far below a pipe's
    buffer, so the write never blocks); closed here once the child has it."""
    r, w = os.pipe()
    try:
        os.write(w, _filter())
    finally:
        os.close(w)
    try:
        yield r
    finally:
        os.close(r)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie (a PID namespace's init turns zombie only after the
    kernel has killed and reaped every other process of its namespace)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def _descendants(pid: int) -> list[int]:
    out, todo = [], _children(pid)
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def _kill_group(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGKILL the process group (nsenter, the call's bwrap, or the holder's) and every descendant, and
    wait until they are gone: a PID namespace's init among them is gone only once the kernel has
    killed every process left in that namespace."""
    inits = _descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in inits:
        try:
            os.kill(pid, signal.SIGKILL)  # it may have left the group (setsid)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.monotonic() + timeout_s
    while not all(_gone(pid) for pid in inits) and time.monotonic() < deadline:
        time.sleep(0.005)
