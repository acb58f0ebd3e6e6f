"""What a fleet worker pays per rollout: a request for a rollout that never started costs a set lookup in an
incrementally read index (not SQL over the whole archive), and a policy call neither builds an HTTP client
nor walks the OpenAI SDK's typed transform, with the same request on the wire."""

from __future__ import annotations

import json

import pytest

from consumers.sink import Sink
from store import archive
from producers.agent_policy import PolicyClient, PolicyEndpoint
from producers.agent_tools import TOOLS
from producers.fleet_log import StartedIndex, log_states
from tests.helpers import produce, rollout_events
from tests.policy_stub import PolicyStub

A, B, C = ("0193bbbb-0000-7000-8000-00000000000a", "0193bbbb-0000-7000-8000-00000000000b",
           "0193bbbb-0000-7000-8000-00000000000c")
NEW = "0193bbbb-0000-7000-8000-0000000000ff"


def test_started_index_reads_each_flush_once_and_log_states_agrees_with_the_full_query(settings, monkeypatch):
    produce(settings, rollout_events(A, 4, end=None, score=None) + rollout_events(B, 3, score=None))
    Sink(settings).run(until_idle=True)
    index = StartedIndex(settings)
    assert index.refresh() >= 1 and {A, B} <= index.ids and NEW not in index.ids
    manifests = []
    real = archive.read_manifest
    monkeypatch.setattr(archive, "read_manifest", lambda path: manifests.append(path) or real(path))
    assert index.refresh() == 0 and manifests == []  # nothing new archived: nothing read, not even a manifest

    produce(settings, rollout_events(C, 2, end=None, score=None))
    Sink(settings).run(until_idle=True)
    before = index.files_read
    assert index.refresh() >= 1 and C in index.ids
    assert index.files_read - before <= 4  # only the new flushes (one per partition at most), not the archive
    assert 0 < len(manifests) <= 4

    ids = [A, B, C, NEW]
    fast, full = log_states(settings, ids, index=index), log_states(settings, ids)
    for rid in ids:
        assert (fast[rid].started, fast[rid].ended, fast[rid].next_step_idx, fast[rid].problem) == \
            (full[rid].started, full[rid].ended, full[rid].next_step_idx, full[rid].problem)
        assert (fast[rid].resume is None) == (full[rid].resume is None)
    assert fast[A].resume.next_step_idx == 4 and fast[B].ended.status == "finished" and fast[C].resume is not None
    assert not fast[NEW].started and fast[NEW].resume is None and fast[NEW].ended is None


def test_policy_calls_share_one_http_client_and_skip_the_sdks_typed_transform(monkeypatch):
    import openai.resources.chat.completions.completions as chat
    import openai.resources.completions as completions

    def refuse(*_a, **_k):
        raise AssertionError("the SDK's typed transform ran (~35 ms of CPU per call with the agent's tools)")

    monkeypatch.setattr(chat, "maybe_transform", refuse)
    monkeypatch.setattr(completions, "maybe_transform", refuse)
    messages = [{"role": "system", "content": "You are an agent."}, {"role": "user", "content": "Do it."}]
    with PolicyStub([{"tool": "bash", "args": {"cmd": "ls"}}]) as stub:
        endpoint = PolicyEndpoint(stub.url, "stub", api_key="k-1")
        one, two = PolicyClient(endpoint, max_tokens=64), PolicyClient(endpoint, max_tokens=64)
        assert one._client is two._client  # one connection pool per endpoint and process
        assert PolicyClient(PolicyEndpoint(stub.url, "stub", api_key="k-2"))._client is not one._client
        c = one.complete(messages, tools=TOOLS, timeout_s=60, rollout_id="r-1")
        one.close()  # a rollout's end leaves the shared client usable for the others
        two.complete(messages, tools=TOOLS, timeout_s=5, rollout_id="r-2")  # near its deadline: the no-retry copy
    assert c.tool_calls[0][1:] == ("bash", json.dumps({"cmd": "ls"})) and c.token_ids and c.logprobs
    body = stub.requests[0].body
    assert body == {"model": "stub", "messages": messages, "tools": TOOLS, "tool_choice": "auto", "temperature": 1.0,
                    "top_p": 1.0, "max_tokens": 64, "logprobs": True, "return_token_ids": True,
                    "return_tokens_as_token_ids": True}
    assert [r.rollout_id for r in stub.requests] == ["r-1", "r-2"]


@pytest.mark.parametrize("reply", [{"choices": []}, {"no": "choices"}, ["a", "list"]])
def test_a_reply_without_choices_is_a_transient_error(reply):
    from producers.agent_policy import _first_choice
    from schemas.errors import TransientError

    with pytest.raises(TransientError, match="returned no choices"):
        _first_choice(reply, "m")


def test_the_scripted_policy_server_takes_a_fleets_burst_of_connects():
    """A fleet opens ~1,000 connections at once; with the default listen backlog (5) most connects would wait
    out SYN retries (1 s, 3 s, ...) before the server saw them."""
    with PolicyStub([], keep_requests=False) as stub:
        assert stub._server.request_queue_size >= 1000
        PolicyClient(PolicyEndpoint(stub.url, "stub")).complete([{"role": "user", "content": "hi"}], tools=TOOLS,
                                                               timeout_s=60, rollout_id="r-1")
        assert stub.requests == [] and stub.cursor == {"r-1": 1}  # answered, not kept


def test_a_flush_missing_its_rollout_started_file_is_read_again_once_restored(settings):
    """A damaged flush (its manifest lists the file, the file is gone) must not be taken as read: once a repair
    puts the file back, the rollout counts as started (else a redelivered request would run it again)."""
    produce(settings, rollout_events(A, 3, end=None, score=None))
    Sink(settings).run(until_idle=True)
    files = [d.files["rollout_started"] for d in archive.list_flushes(settings.archive, settings.topics.rollouts)
             if "rollout_started" in d.files]
    assert len(files) == 1
    aside = files[0].with_name("aside.bin")
    files[0].rename(aside)
    index = StartedIndex(settings)
    assert index.refresh() == 0 and A not in index.ids
    aside.rename(files[0])
    assert index.refresh() == 1 and A in index.ids


def test_started_index_on_an_s3_archive(settings, s3_url):
    """The same index over a bucket (SeaweedFS): flushes read once, their manifests not fetched again."""
    import dataclasses

    s3 = dataclasses.replace(settings, archive_url=s3_url())
    produce(s3, rollout_events(A, 3, end=None, score=None))
    Sink(s3).run(until_idle=True)
    index = StartedIndex(s3)
    assert index.refresh() == 1 and A in index.ids and NEW not in index.ids
    assert index.refresh() == 0
    states = log_states(s3, [A, NEW], index=index)
    assert states[A].resume.next_step_idx == 3 and not states[NEW].started
