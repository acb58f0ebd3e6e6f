"""A producer that is not this codebase: librdkafka (through confluent-kafka) sends a rollout built from the
exported JSON Schemas and README "Producing events from any language" alone: plain JSON documents, topics
per event type, key = rollout_id, partitioner murmur2_random. It confirms archiving the way the README says
(`klong status --json`: archived_to past each delivered offset; the sink's committed offsets), and the
rollout is found in `klong sql`. Nothing from schemas/, producers/ or consumers/ builds the events."""

from __future__ import annotations

import base64
import datetime as dt
import json
import struct
import subprocess
import sys
import uuid

import jsonschema
from confluent_kafka import Consumer, Producer, TopicPartition
from kafka.partitioner.default import murmur2


def klong(settings, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "klong.cli", *args, "--home", str(settings.home),
                           "--bootstrap-servers", settings.bootstrap_servers, "--topic-prefix", settings.topics.prefix,
                           "-q"], capture_output=True, text=True, timeout=300)


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def envelope(event_type: str, rollout_id: str, payload: dict) -> dict:
    return {"event_id": str(uuid.uuid4()), "event_type": event_type, "schema_version": 1, "producer_id": "go-agent-7",
            "produced_at": now(), "rollout_id": rollout_id, "payload": payload}


def rollout(rollout_id: str) -> list[dict]:
    """README's example: start, a pinned system + user prefix, one tool turn, end (token ids in both forms)."""
    ids = [101, 102, 103]
    return [
        envelope("rollout_started", rollout_id, {"task_id": "paper-1", "group_id": "sample-1", "timeout_s": 7200}),
        envelope("step", rollout_id, {"step_idx": 0, "role": "system", "content": "You are an agent.", "pinned": True}),
        envelope("step", rollout_id, {"step_idx": 1, "role": "user", "content": "Reproduce the paper.", "pinned": True}),
        envelope("step", rollout_id, {"step_idx": 2, "role": "assistant", "content": "ls",
                                      "tool_call": {"name": "bash", "arguments": "{\"cmd\": \"ls\"}", "id": "c1"},
                                      "token_ids": ids, "logprobs": [-0.5, -0.25, -1.0]}),
        envelope("step", rollout_id, {"step_idx": 3, "role": "tool", "content": "paper.md", "tool_call_id": "c1",
                                      "token_ids": base64.b64encode(struct.pack("<3i", 7, 8, 9)).decode()}),
        envelope("rollout_ended", rollout_id, {"status": "finished", "n_steps": 4, "elapsed_s": 12.5}),
    ]


def test_confluent_kafka_producer_follows_the_schemas_and_readme(make_settings, tmp_path):
    settings = make_settings(partitions=4)
    assert klong(settings, "schemas", "export", str(tmp_path / "schemas")).returncode == 0
    schema = json.loads((tmp_path / "schemas" / "events.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)

    topic = f"{settings.topics.prefix}.rollouts"  # README: rollout events go to <prefix>.rollouts
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers, "partitioner": "murmur2_random",
                         "enable.idempotence": True, "acks": "all"})
    delivered: list[tuple[str, int, int, bytes]] = []

    def on_delivery(err, msg):
        assert err is None, err
        delivered.append((msg.topic(), msg.partition(), msg.offset(), msg.key()))

    rollout_ids = [f"go-{k}" for k in range(4)]  # murmur2 puts them on 3 of the 4 partitions
    for rid in rollout_ids:
        for ev in rollout(rid):
            validator.validate(ev)  # what the producer checks before sending
            producer.produce(topic, key=rid.encode(), value=json.dumps(ev).encode(), on_delivery=on_delivery)
    assert producer.flush(60) == 0
    assert len(delivered) == 6 * len(rollout_ids)
    for _, partition, _, key in delivered:  # murmur2_random = the Java client's (and the SDK's) partition per key
        assert partition == (murmur2(key) & 0x7FFFFFFF) % 4
    assert len({partition for _, partition, _, _ in delivered}) == 3

    sink = klong(settings, "sink", "run", "--until-idle")
    assert sink.returncode == 0, sink.stderr
    assert "0 dead letters" in sink.stdout

    # Confirmation, way 1: klong status --json says each partition is archived past the delivered offsets.
    status = klong(settings, "status", "--json")
    assert status.returncode == 0, status.stderr
    archived = {(p["topic"], p["partition"]): p["archived_to"] for p in json.loads(status.stdout)["partitions"]}
    for t, partition, offset, _ in delivered:
        assert archived[(t, partition)] > offset
    # Way 2: the sink's committed offsets (consumer group <prefix>.sink), readable from any Kafka client.
    reader = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": f"{settings.topics.prefix}.sink",
                       "enable.auto.commit": False})
    try:
        parts = sorted({(t, p) for t, p, _, _ in delivered})
        committed = {(tp.topic, tp.partition): tp.offset
                     for tp in reader.committed([TopicPartition(t, p) for t, p in parts], timeout=30)}
    finally:
        reader.close()
    for t, partition, offset, _ in delivered:
        assert committed[(t, partition)] > offset

    out = klong(settings, "sql", "SELECT rollout_id, status, n_steps, n_turns FROM rollouts ORDER BY rollout_id",
                "--format", "json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["rollout_id"] for r in rows] == sorted(rollout_ids)
    assert all(r["status"] == "finished" and r["n_steps"] == 4 and r["n_turns"] == 1 for r in rows)
    toks = klong(settings, "sql", f"SELECT step_idx, token_ids, logprobs FROM step_tokens WHERE rollout_id = "
                                  f"'{rollout_ids[0]}' AND token_ids IS NOT NULL ORDER BY step_idx", "--format", "csv")
    assert toks.returncode == 0, toks.stderr
    assert toks.stdout.splitlines()[1:] == ['2,"[101, 102, 103]","[-0.5, -0.25, -1.0]"', '3,"[7, 8, 9]",']
