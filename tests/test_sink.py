"""The archive sink against the real broker: exactly-once under kill -9, dead letters, group split."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time

import duckdb
import pytest

from consumers.sink import Sink
from schemas.events import event_type
from store.archive import list_flushes
from store.catalog import Catalog
from tests.helpers import kill_sinks_repeatedly, produce, rollout_events


def raw_counts(settings, table="step"):
    """(rows, distinct event_ids) over the raw archive files, no dedup: proves nothing was written twice."""
    glob = f"{settings.archive_dir}/*/*/*/{table}.parquet"
    return duckdb.sql(f"SELECT count(*), count(DISTINCT event_id) FROM read_parquet('{glob}')").fetchall()[0]


def sink_cmd(settings, *extra):
    return [sys.executable, "-m", "klong", "sink", "run", "--home", str(settings.home), "--bootstrap-servers",
            settings.bootstrap_servers, "--topic-prefix", settings.topics.prefix, "-q", *extra]


def test_sink_archives_and_views_count(settings):
    events = [e for r in range(4) for e in rollout_events(f"r{r}", 30, seed=r, group_id=f"g{r % 2}")]
    produce(settings, events)
    stats = Sink(settings).run(until_idle=True)
    assert stats.events == len(events) and stats.dead_letters == 0
    cat = Catalog(settings)
    rollouts = cat.sql("SELECT rollout_id, status, n_steps, n_turns, final_score FROM rollouts ORDER BY rollout_id")
    assert rollouts["rollout_id"].to_list() == ["r0", "r1", "r2", "r3"]
    assert set(rollouts["status"]) == {"finished"} and set(rollouts["n_steps"]) == {30}
    assert set(rollouts["n_turns"]) == {14}  # steps 3, 5, ..., 29 are assistant steps
    assert set(rollouts["final_score"]) == {0.5}
    steps = cat.sql("SELECT rollout_id, step_idx, role, n_tokens, pinned FROM steps WHERE rollout_id = 'r0' ORDER BY step_idx")
    assert steps["step_idx"].to_list() == list(range(30))
    assert steps["pinned"].to_list() == [True, True] + [False] * 28
    # token arrays round-trip exactly
    tok = cat.sql("SELECT token_ids FROM step_tokens WHERE rollout_id = 'r0' AND step_idx = 3")["token_ids"][0].to_list()
    from schemas.arrow import decode_array
    assert tok == decode_array(events[4].payload.token_ids, "int32").tolist()
    # a second run finds nothing new: positions recovered from the archive
    assert Sink(settings).run(until_idle=True).events == 0
    assert raw_counts(settings) == (120, 120)


def test_producer_resends_are_deduplicated_in_views(settings):
    events = rollout_events("dup", 10)
    produce(settings, events + events[3:7])  # an at-least-once resend of four events
    Sink(settings).run(until_idle=True)
    assert raw_counts(settings)[0] == 14
    assert Catalog(settings).scalar("SELECT count(*) FROM steps") == 10


MALFORMED = [
    b"{", b"not json at all", b"\xff\xfe\xfa", b"[1, 2, 3]", b"null", b"",
    b'{"event_type": "no_such_type", "event_id": "x"}',
    b'{"event_type": "step"}',  # missing fields
    '{"event_type":"step","event_id":"e","producer_id":"p","produced_at":"2026-01-01T00:00:00Z",'
    '"rollout_id":"r","payload":{"step_idx":1,"role":"user","content":"\xff"}}'.encode("latin-1"),  # bad UTF-8 in a string
]


def _bad_step(**payload):
    base = {"step_idx": 1, "role": "user"}
    base.update(payload)
    return json.dumps({"event_type": "step", "event_id": "e", "producer_id": "p", "produced_at": "2026-01-01T00:00:00Z",
                       "rollout_id": "r", "payload": base}).encode()


MALFORMED += [
    _bad_step(step_idx=-1), _bad_step(step_idx="seven"), _bad_step(role="wizard"),
    _bad_step(token_ids="%%%not base64"), _bad_step(token_ids="AAA="),  # 2 bytes: not int32
    _bad_step(role="assistant", token_ids=[1, 2], logprobs=[-0.1]),  # logprobs/token mismatch
    _bad_step(logprobs=[-0.1], token_ids=[1]),  # logprobs on a user step
    _bad_step(blob_ref="sha256:" + "0" * 64),  # claim check pointing nowhere
    json.dumps({"event_type": "rollout_ended", "event_id": "e", "producer_id": "p", "produced_at": "2026-01-01T00:00:00Z",
                "rollout_id": "r", "payload": {"status": "exploded", "n_steps": 3}}).encode(),
    json.dumps({"event_type": "judge_result", "event_id": "e", "producer_id": "p", "produced_at": "2026-01-01T00:00:00Z",
                "rollout_id": "r", "payload": {"request_id": "q", "step_idx": 1, "judge_model": "m", "score": 1.5, "valid": True}}).encode(),
    json.dumps({"event_type": "step", "event_id": "e", "producer_id": "p", "produced_at": "yesterday",
                "rollout_id": "r", "payload": {"step_idx": 1, "role": "user"}}).encode(),
]


def test_malformed_messages_go_to_dead_letters(settings):
    good = rollout_events("good", 20)
    raw = [(settings.topics.rollouts, f"k{i}".encode(), MALFORMED[i % len(MALFORMED)]) for i in range(230)]
    random.Random(0).shuffle(raw)
    produce(settings, good[:10], raw[:115])
    produce(settings, good[10:], raw[115:])
    stats = Sink(settings).run(until_idle=True)
    assert stats.dead_letters == 230
    cat = Catalog(settings)
    dead = cat.sql("SELECT error_kind, error, raw, partition, \"offset\" FROM dead_letters")
    assert dead.height == 230
    assert set(dead["error_kind"]) >= {"json", "schema", "payload", "empty", "claim_check"}
    assert all(e for e in dead["error"])
    assert sorted(dead["raw"].to_list()) == sorted(v for _, _, v in raw)  # raw bytes kept exactly
    assert dead.select("partition", "offset").n_unique() == 230
    # valid events unaffected
    assert cat.scalar("SELECT count(*) FROM steps WHERE rollout_id = 'good'") == 20
    assert cat.scalar("SELECT status FROM rollouts WHERE rollout_id = 'good'") == "finished"


def test_kill_minus_nine_exactly_once(settings):
    """kill -9 the sink at random points while events flow; every event ends up archived exactly once."""
    rng = random.Random(42)
    produced: list = []
    stop = threading.Event()

    def producer():  # events keep flowing for as long as the sinks are being killed
        r = 0
        while not stop.is_set():
            batch = rollout_events(f"k{r}", 60, seed=r)
            produce(settings, batch)
            produced.extend(batch)
            r += 1
            time.sleep(0.3)

    t = threading.Thread(target=producer)
    t.start()
    try:  # start-up (interpreter + writer process) takes ~1 s, far more on a loaded machine
        kills, kills_after_progress = kill_sinks_repeatedly(
            lambda: subprocess.Popen(sink_cmd(settings, "--flush-interval", "0.1"), stdout=subprocess.DEVNULL),
            lambda: len(list_flushes(settings.archive_dir)), rng, kills=10, random_s=(0.8, 3.0))
    finally:
        stop.set()
        t.join()
    assert kills >= 10 and kills_after_progress >= 5, (kills, kills_after_progress)
    Sink(settings).run(until_idle=True)
    n_steps = sum(1 for e in produced if event_type(e) == "step")
    n_rollouts = n_steps // 60
    assert raw_counts(settings) == (n_steps, n_steps)  # no event lost, none written twice
    assert raw_counts(settings, "rollout_ended") == (n_rollouts, n_rollouts)
    assert not list((settings.archive_dir / "_tmp").glob("*"))  # temp dirs of killed writers cleaned


def test_two_sinks_in_a_group_split_partitions(settings):
    events = [e for r in range(16) for e in rollout_events(f"g{r}", 40, seed=r)]
    produce(settings, events)
    procs = [subprocess.Popen(sink_cmd(settings, "--group", "--until-idle"), stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    # leftovers (a sink may exit before the group settles) are picked up by one more run; nothing doubles
    Sink(settings).run(until_idle=True)
    assert raw_counts(settings) == (640, 640)


def test_sql_refuses_writes_and_reads_empty_archive(settings):
    cat = Catalog(settings)
    assert cat.scalar("SELECT count(*) FROM rollouts") == 0  # views exist before any data
    from store.catalog import QueryError
    for q in ["CREATE TABLE x (a INT)", "COPY (SELECT 1) TO '/tmp/x.csv'", "INSERT INTO steps VALUES (1)",
              "ATTACH 'x.db'", "SELECT 1; DROP VIEW steps", "INSTALL httpfs"]:
        with pytest.raises(QueryError):
            cat.sql(q)


def test_oversized_observation_round_trips_through_claim_check_into_the_archive(settings):
    from producers.outbox import Outbox
    from producers.recorder import RolloutRecorder
    from schemas.claimcheck import MAX_EVENT_BYTES

    text = "".join(chr(0x41 + i % 26) for i in range(3_000_000))  # a 3 MB tool output
    tokens = list(range(400_000))
    with Outbox(settings, retain="acked") as outbox:
        with RolloutRecorder(outbox, task_id="t", group_id="g", timeout_s=60) as rec:
            rec.observation(text, token_ids=tokens)
            rec.action("ok", token_ids=[1, 2], logprobs=[-0.5, -0.25])
        outbox.flush(timeout=60)
    assert any(settings.blob_dir.rglob("*")), "the big step did not go by claim check"
    stats = Sink(settings).run(until_idle=True)
    assert stats.dead_letters == 0
    cat = Catalog(settings)
    row = cat.arrow("SELECT s.content, s.claim_checked, t.token_ids FROM steps s JOIN step_tokens t USING (rollout_id, step_idx) "
                    "WHERE s.step_idx = 0").to_pylist()[0]
    assert row["claim_checked"] and row["content"] == text and row["token_ids"] == tokens
    assert MAX_EVENT_BYTES < len(text)


def test_an_archive_with_list_token_arrays_gets_a_clear_error(tmp_path):
    """Step files from before token arrays were archived as binary: the catalog says what to do."""
    import pyarrow as pa

    from core.settings import Settings
    from schemas.arrow import as_list_array, to_table
    from store.archive import write_flush
    from store.catalog import Catalog, QueryError

    s = Settings(home=tmp_path / "home")
    evs = [ev for ev in rollout_events("old", 4) if ev.payload.__class__.__name__ == "StepPayload"]
    table, _ = to_table("step", [(ev, "t.rollouts", 0, i) for i, ev in enumerate(evs)])
    i = table.schema.get_field_index("token_ids")
    table = table.set_column(i, "token_ids", as_list_array(table.column("token_ids"), "int32"))
    write_flush(s.archive_dir, "t.rollouts", "x", 0, 0, len(evs) - 1, {"step": table})
    with pytest.raises(QueryError, match="token arrays as Parquet lists"):
        Catalog(s).sql("SELECT count(*) FROM steps")
    assert pa.types.is_list(table.schema.field("token_ids").type)
