"""Cost of one sandboxed tool call: `true` in the isolated local sandbox (per call: nsenter into the
rollout's namespaces, a nested bwrap with its own PID namespace, no capabilities and the seccomp
filter, prlimit, bash) beside the same call as a plain subprocess, in the same run.

    .venv/bin/python bench/sandbox.py [--calls 200]

Prints the median and p90 wall time per call of each, the overhead (sandbox - plain, median) against
the goal (<= 20 ms), and the one-off cost of starting a rollout's sandbox.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from producers.sandbox import SandboxLimits, SubprocessSandbox  # noqa: E402
from producers.sandbox_local import NamespaceSandbox  # noqa: E402

GOAL_MS = 20.0


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=200, help="calls of each kind, interleaved (default 200)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        sb = NamespaceSandbox(Path(tmp) / "ns", SandboxLimits())
        sb.setup({"paper.md": "x\n"})
        start_ms = (time.perf_counter() - t) * 1000
        plain = SubprocessSandbox(Path(tmp) / "plain", SandboxLimits())
        plain.setup({})
        bare, unsafe, isolated = [], [], []
        for _ in range(args.calls):  # interleaved: machine load hits all three alike
            bare += timed(lambda: subprocess.run(["true"]), 1)
            unsafe += timed(lambda: plain.run("true", timeout_s=30), 1)
            isolated += timed(lambda: sb.run("true", timeout_s=30), 1)
        sb.close()

    def line(name: str, xs: list[float]) -> None:
        q = statistics.quantiles(xs, n=10)
        print(f"{name:<40} median {statistics.median(xs):7.2f} ms   p90 {q[-1]:7.2f} ms")

    line("plain subprocess.run(['true'])", bare)
    line("unsafe-local sandbox run('true')", unsafe)
    line("local (namespaces) sandbox run('true')", isolated)
    overhead = statistics.median(isolated) - statistics.median(bare)
    print(f"sandbox overhead per call (median, vs plain subprocess): {overhead:.2f} ms "
          f"(goal <= {GOAL_MS:.0f} ms: {'met' if overhead <= GOAL_MS else 'NOT met'})")
    print(f"sandbox start per rollout: {start_ms:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
