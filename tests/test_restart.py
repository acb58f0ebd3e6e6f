"""The property the system rests on: a memory broker restart loses nothing.

A recorder produces through the durable outbox while a sink archives; the broker is stopped (every
event it held and the sink had not archived is gone) and restarted on the same port; the outbox
resends what the archive does not confirm, the sink notices the topics' new incarnation, and in the
end every event is in the archive views exactly once.
"""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np

from consumers.sink import Sink
from services.broker import BrokerProcess, ensure_topics, free_port
from core.settings import Settings, Topics
from producers.outbox import Outbox
from producers.recorder import RolloutRecorder
from store.catalog import Catalog


def test_broker_restart_loses_nothing(tmp_path):
    port = free_port()
    broker = BrokerProcess.start(port, tmp_path / "broker.log")
    settings = Settings(home=tmp_path / "home", bootstrap_servers=broker.bootstrap, topics=Topics(f"r{uuid.uuid4().hex[:8]}"))
    ensure_topics(settings)
    stop_sink = threading.Event()
    sink_thread = threading.Thread(target=lambda: Sink(settings, flush_interval_s=0.2).run(should_stop=stop_sink.is_set))
    sink_thread.start()
    rng = np.random.default_rng(0)
    ids: list[str] = []
    try:
        with Outbox(settings, fsync="batch") as outbox:
            recs = [RolloutRecorder(outbox, task_id="t", group_id="g", timeout_s=100) for _ in range(4)]
            for rec in recs:
                rec.start()
                ids.append(rec.rollout_id)
            for i in range(150):
                if i == 60:  # once the sink archived a part (an event: a loaded machine may take seconds)
                    deadline = time.monotonic() + 300
                    while not any((settings.archive_dir / settings.topics.rollouts).rglob("manifest.json")):
                        assert time.monotonic() < deadline, "the sink archived nothing in 300 s"
                        time.sleep(0.05)
                    broker.stop()  # memory broker: everything not yet archived is gone
                if i == 90:
                    broker = BrokerProcess.start(port, tmp_path / "broker.log")
                for rec in recs:
                    if i % 2:
                        rec.action(f"act {i}", token_ids=rng.integers(0, 1000, 20), logprobs=-rng.random(20))
                    else:
                        rec.observation(f"obs {i}", token_ids=rng.integers(0, 1000, 40))
                time.sleep(0.01)
            for rec in recs:
                rec.end("finished")
            outbox.flush(timeout=120)  # returns once the sink has archived everything
            assert outbox.pending() == 0
    finally:
        stop_sink.set()
        sink_thread.join(timeout=60)
        broker.stop()
    cat = Catalog(settings)
    steps = cat.sql("SELECT rollout_id, count(*) AS n, count(DISTINCT step_idx) AS d, min(step_idx) AS lo, "
                    "max(step_idx) AS hi FROM steps GROUP BY rollout_id ORDER BY rollout_id")
    assert sorted(steps["rollout_id"].to_list()) == sorted(ids)
    assert set(steps["n"]) == {150} and set(steps["d"]) == {150} and set(steps["lo"]) == {0} and set(steps["hi"]) == {149}
    assert set(cat.sql("SELECT status FROM rollouts")["status"]) == {"finished"}
    # the archive holds two incarnations of the rollouts topic: before and after the restart
    assert len(list((settings.archive_dir / settings.topics.rollouts).iterdir())) == 2
