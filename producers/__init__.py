"""Producers: how events get into Kafka without ever being lost.

- `producers.outbox.Outbox`: the durable local spool every producer writes through (fsync, resend
  after broker restarts until the archive sink has the record).
- `producers.recorder.RolloutRecorder`: the SDK an agent scaffold uses to record a rollout;
  `publish(outbox, event)` for single events (tasks, judge results).
- `producers.simulate.simulate`: deterministic synthetic long-horizon rollouts (`klong simulate`).
"""

from core import aliases as _aliases

_aliases.install()  # producers.scheduler, producers.rl_plan, ... still import (deprecated; see core.aliases)

from producers.outbox import Outbox, OutboxStats  # noqa: E402  (after install: old paths work from here on)
from producers.recorder import RolloutRecorder, publish  # noqa: E402
from producers.simulate import SimSummary, simulate  # noqa: E402

__all__ = ["Outbox", "OutboxStats", "RolloutRecorder", "publish", "SimSummary", "simulate"]
