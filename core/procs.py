"""Small OS helpers shared across the pipeline: process liveness, fsync by path."""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def signals_to(handler, signums=(signal.SIGINT, signal.SIGTERM)):
    """Routes SIGINT/SIGTERM to `handler` while the block runs and puts the previous handlers back after it,
    so a command run in-process (tests, the demo) leaves no handler behind that would swallow a later Ctrl-C."""
    previous = {n: signal.signal(n, handler) for n in signums}
    try:
        yield
    finally:
        for n, h in previous.items():
            signal.signal(n, h)


def pid_alive(pid: int) -> bool:
    """True while the process exists and has not exited (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by path (a directory: makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_supervised(cmd, *, env: dict, timeout_s: "float | None", check, what: str, shell: bool = False,
                   poll_s: float = 0.2) -> int:
    """Runs `cmd` in its own process group until it exits (returns its exit status), calling `check()` every
    `poll_s` (it raises to stop, e.g. on Ctrl-C); past `timeout_s` (None: no limit) raises TerminalError naming
    `what`. Whatever ends the wait, the whole group is terminated."""
    import signal
    import subprocess
    import time

    from schemas.errors import TerminalError

    proc = subprocess.Popen(cmd, shell=shell, env=env, start_new_session=True)
    t0 = time.monotonic()
    try:
        while proc.poll() is None:
            if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                raise TerminalError(f"{what} ran past train.timeout ({timeout_s:g}s)")
            check()
            time.sleep(poll_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
    return proc.returncode
