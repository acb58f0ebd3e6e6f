"""Commands to rollouts wherever they run: the scheduler's side (`ControlWriter`) and the workers' (`ControlReader`).

    writer = ControlWriter(settings, producer, run_id)
    writer.carry_over(rollout_id, iteration=4, policy_version=4, wait_served=True)
    writer.served(4)                       # policy version 4 is served: carried-over rollouts go on
    writer.stop(rollout_id)                # end at the next turn boundary (aborted)

    reader = ControlReader(settings); reader.start()       # every worker reads the whole topic
    reader.attach(rollout_id, control)                     # a RolloutControl: pending commands apply now

A worker reads `<prefix>.rollout.control` from its start, so a command sent while the rollout was still
a queued request, or running on a worker that was then lost, applies when the rollout (re)starts. A
carry-over applies only if it moves the rollout forward (a later iteration than it is in).
"""

from __future__ import annotations

import logging
import threading
from typing import Optional

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from core.settings import Settings
from schemas.errors import BrokerError, KlongError
from schemas.fleet import RolloutCommand, decode_message, encode_message

log = logging.getLogger("klong.fleet")


class ControlWriter:
    def __init__(self, settings: Settings, producer: KafkaProducer, run_id: str = ""):
        self.topic, self.producer, self.run_id = settings.topics.rollout_control, producer, run_id

    def _send(self, cmd: RolloutCommand) -> None:
        self.producer.send(self.topic, key=cmd.rollout_id.encode(), value=encode_message(cmd)).get(timeout=60)

    def carry_over(self, rollout_id: str, *, iteration: int, policy_version: int, wait_served: bool) -> None:
        self._send(RolloutCommand(rollout_id=rollout_id, action="carry_over", iteration=iteration,
                                  policy_version=policy_version, wait_served=wait_served, run_id=self.run_id))

    def stop(self, rollout_id: str) -> None:
        self._send(RolloutCommand(rollout_id=rollout_id, action="stop"))

    def served(self, policy_version: int) -> None:
        self._send(RolloutCommand(rollout_id="*", action="served", policy_version=policy_version, run_id=self.run_id))


class ControlReader:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._latest: dict[str, RolloutCommand] = {}  # rollout_id -> its last carry_over / stop
        self._served: dict[tuple[str, int], threading.Event] = {}  # (run_id, policy_version)
        self._controls: dict[str, object] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._caught_up = threading.Event()

    def start(self, timeout_s: float = 120.0) -> None:
        """Starts reading; returns once the topic is read up to its end as of now."""
        self._thread = threading.Thread(target=self._run, name="klong-fleet-control", daemon=True)
        self._thread.start()
        if not self._caught_up.wait(timeout_s):
            raise BrokerError(f"could not read {self.settings.topics.rollout_control} within {timeout_s:.0f} s")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def served_event(self, run_id: str, policy_version: int) -> threading.Event:
        with self._lock:
            return self._served.setdefault((run_id, policy_version), threading.Event())

    def attach(self, rollout_id: str, control) -> None:
        with self._lock:
            self._controls[rollout_id] = control
            cmd = self._latest.get(rollout_id)
        if cmd is not None:
            self._apply(control, cmd)

    def detach(self, rollout_id: str) -> None:
        with self._lock:
            self._controls.pop(rollout_id, None)

    def _apply(self, control, cmd: RolloutCommand) -> None:
        if cmd.action == "stop":
            control.stop()
        elif cmd.action == "carry_over" and cmd.iteration > control.iteration:
            control.carry_over(cmd.iteration, cmd.policy_version,
                               served=self.served_event(cmd.run_id, cmd.policy_version) if cmd.wait_served else None)

    def _on(self, cmd: RolloutCommand) -> None:
        if cmd.action == "served":
            self.served_event(cmd.run_id, cmd.policy_version).set()
            return
        with self._lock:
            prev = self._latest.get(cmd.rollout_id)
            if prev is None or prev.action != "stop":  # a stop is final
                self._latest[cmd.rollout_id] = cmd
            control = self._controls.get(cmd.rollout_id)
        if control is not None:
            self._apply(control, cmd)

    def _run(self) -> None:
        topic = self.settings.topics.rollout_control
        consumer = KafkaConsumer(**self.settings.kafka_config(), enable_auto_commit=False)
        try:
            tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            ends = consumer.end_offsets(tps)
            while not self._stop.is_set():
                for records in consumer.poll(timeout_ms=200).values():
                    for r in records:
                        try:
                            self._on(decode_message(r.value, RolloutCommand))
                        except KlongError as e:  # contained: one bad command never stops the others
                            log.error("control %s@%d skipped: %s", topic, r.offset, e)
                if not self._caught_up.is_set() and all(consumer.position(tp) >= ends[tp] for tp in tps):
                    self._caught_up.set()
        except Exception:
            log.exception("the control reader stopped: commands are not applied any more")
        finally:
            consumer.close()
