"""The background services of a progressive-RL run (`rl.scheduler`): the sink and the judge, in threads.

    services = Services(say)
    services.start(settings, plan, embedded_sink=True)   # a Sink thread; a JudgeWorker thread with plan.judge
    services.check()                                     # raises the error of a service that failed
    services.stop()                                      # the judge first, the sink last

Unless `embedded_sink=False` (an external `klong sink run` archives), a `consumers.sink.Sink` runs in a
daemon thread; with a `judge:` endpoint in the plan a `consumers.judge.JudgeWorker` runs in another
(`judge: checks` grades with the deterministic checks alone, no model); otherwise `klong judge run` must
run. A service that raises keeps its error: `say` reports it at once and `check()` raises it, so the
scheduler's next wait stops the run. `stop()` asks every service to stop and joins it (60 s each), the
sink last so it archives what the judge wrote.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from core.settings import Settings
from rl.plan import RlPlan


class Services:
    def __init__(self, say: Callable[[str], None]):
        self._say = say
        self._threads: list[tuple[threading.Thread, threading.Event, dict]] = []

    def start(self, settings: Settings, plan: RlPlan, *, embedded_sink: bool) -> None:
        if embedded_sink:
            from consumers.sink import Sink

            sink = Sink(settings)
            self.add("sink", lambda stop: sink.run(should_stop=stop.is_set))
        if plan.judge is not None:
            from consumers.checks import ChecksOnlyClient
            from consumers.grading import GraderConfig
            from consumers.judge import JudgeConfig, JudgeWorker

            j = plan.judge
            client = ChecksOnlyClient() if plan.checks_only else None  # `judge: checks`: no model
            grader = client.cfg if client else GraderConfig(base_url=j.base_url, model=j.model,
                                                            **({"api_key_env": j.api_key_env} if j.api_key_env else {}))
            worker = JudgeWorker(settings, grader, JudgeConfig(concurrency=plan.judge_concurrency), client=client)
            self.add("judge", lambda stop: worker.run(should_stop=stop.is_set))

    def add(self, name: str, target: Callable[[threading.Event], Any]) -> None:
        """Runs `target(stop_event)` in a daemon thread named klong-rl-<name>."""
        stop, box = threading.Event(), {}

        def main() -> None:
            try:
                target(stop)
            except BaseException as e:  # reported by check() at the scheduler's next wait
                box["error"] = e
                self._say(f"{name} failed: {type(e).__name__}: {e}")

        t = threading.Thread(target=main, name=f"klong-rl-{name}", daemon=True)
        t.start()
        self._threads.append((t, stop, box))

    def check(self) -> None:
        """Raises the error of a failed service."""
        for _, _, box in self._threads:
            if "error" in box:
                raise box["error"]

    def stop(self) -> None:
        for t, stop, _ in reversed(self._threads):  # the judge first, the sink last: it archives the rest
            stop.set()
            t.join(timeout=60)
        self._threads.clear()
