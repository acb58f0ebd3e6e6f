"""The viewer's search through the word index (store.search_index) gives exactly the scan's hits: a property test
over random archives (case, unicode, punctuation, tool-call arguments, re-sent and conflicting events, flushes
archived after the index was built), the freshness of the index (new flushes found at once and indexed later;
a quarantined or rewritten file never read from a stale segment), and search text that is data, never SQL.

The archive is written by the sink's flush code without a broker (tests.test_materialize.archive); DuckDB,
Parquet and the index files are real. The browser test of /search is in test_ui.py."""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings as hsettings
from hypothesis import strategies as st

from core.settings import Settings, Topics
from schemas.events import (RolloutStarted, RolloutStartedPayload, Step, StepPayload, ToolCall, decode, encode,
                            new_event)
from store.archive import list_flushes
from store.catalog import Catalog
from store.search_index import MAX_SEGMENTS, StepIndex, terms
from ui import finder
from ui.query import Limits
from tests.test_materialize import archive

T0 = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)
WORDS = ["Traceback", "error", "seq", "1", "3000", "it's", "naïve", "STRASSE", "straße", "\u212aelvin", "İstanbul",
         "a_b", "x-y", "->", "{", "}", '"cmd"', "'", "%", "_", "\\", "$needle", "--", ";", "DROP", "..."]
SEPS = [" ", "\n", "", ", ", "/", "\t"]


def text(draw_words: list[tuple[str, str]]) -> str:
    return "".join(w + s for w, s in draw_words)


content = st.lists(st.tuples(st.sampled_from(WORDS), st.sampled_from(SEPS)), max_size=12).map(text)
step = st.tuples(st.sampled_from(["system", "user", "assistant", "tool"]), content,
                 st.one_of(st.none(), content))  # role, content, tool-call arguments
rollout = st.tuples(st.lists(step, min_size=1, max_size=6), st.integers(0, 3), st.booleans())  # steps, start, started


def events(rid: str, steps, start_min: int, started: bool) -> list:
    evs = [new_event(RolloutStarted, rollout_id=rid, produced_at=T0 + dt.timedelta(minutes=start_min),
                     payload=RolloutStartedPayload(task_id="t", group_id=f"g-{rid}", timeout_s=60.0))] if started else []
    for i, (role, body, args) in enumerate(steps):
        call = ToolCall(name="bash", arguments=args) if args is not None and role == "assistant" else None
        evs.append(new_event(Step, rollout_id=rid, produced_at=T0 + dt.timedelta(minutes=start_min, seconds=i + 1),
                             payload=StepPayload(step_idx=i, role=role, content=body, tool_call=call)))
    return evs


def home(root: Path) -> Settings:
    settings = Settings(home=root / "home", topics=Topics("s"), partitions=3)
    settings.home.mkdir(parents=True)
    return settings


def both(cat: Catalog, index: StepIndex, needle: str, **kw) -> dict:
    """The indexed search's answer, checked equal to the scan's."""
    got = finder.search(cat, Limits(), needle, index=index, **kw)
    assert got == finder.search(cat, Limits(), needle, index=None, **kw), (needle, kw)
    return got


@pytest.mark.parametrize("needle, want", [
    ("seq 1 3000", [("seq", "suffix"), ("1", "exact"), ("3000", "prefix")]),
    ("trace", [("trace", "contains")]),
    (" ok(", [("ok", "exact")]),
    ("->", []),
    ("it's", [("it", "suffix"), ("s", "prefix")]),
    ("naïve", [("na", "suffix"), ("ve", "prefix")]),  # a non-ASCII letter separates words, here and in the index
])
def test_terms_say_how_each_word_of_the_needle_sits_in_the_text(needle, want):
    assert terms(needle) == want


@hsettings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(first=st.lists(rollout, min_size=1, max_size=4), later=st.lists(rollout, max_size=2),
       needles=st.lists(st.one_of(content, st.sampled_from(WORDS)), min_size=1, max_size=4),
       cuts=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 12)), min_size=1, max_size=4),
       resend=st.booleans(), conflict=st.booleans())
def test_the_index_finds_exactly_what_the_scan_finds(monkeypatch, first, later, needles, cuts, resend, conflict):
    monkeypatch.setattr(finder, "PAGE", 3)  # pages and growing batches with a handful of steps
    monkeypatch.setattr(finder, "FIRST_BATCH", 2)
    with tempfile.TemporaryDirectory() as tmp:
        settings = home(Path(tmp))
        evs = [e for k, r in enumerate(first) for e in events(f"r{k}", *r)]
        archive(settings, evs, flush_size=5)
        index = StepIndex(settings)
        index.update()
        assert index.pending() == 0
        more = [e for k, r in enumerate(later) for e in events(f"n{k}", *r)]
        steps = [e for e in evs if isinstance(e, Step)]
        if resend:  # the same events again, later in the archive: the views keep one copy
            more += [decode(encode(e)) for e in steps[:3]]
        if conflict:  # one event id with other content: the copy archived first counts, here too
            e = steps[-1]
            more.append(new_event(Step, event_id=e.event_id, rollout_id=e.rollout_id, produced_at=e.produced_at,
                                  payload=StepPayload(step_idx=e.payload.step_idx, role="user", content="seq 1 3000")))
        archive(settings, more, flush_size=4)  # pending: not in any segment yet
        cat = Catalog(settings)
        bodies = [s.payload.content for s in steps if s.payload.content]
        picks = [b[a % len(b):a % len(b) + n] for (a, n), b in zip(cuts, bodies * len(cuts))]
        scopes = [{"page": 0}, {"page": 1}, {"rollout": "r0"}, {"role": "tool"}]
        for k, needle in enumerate(needles + picks + ["seq 1 3000"]):
            if needle.strip():
                both(cat, index, needle, **scopes[k % len(scopes)])
        index.update()  # the later flushes indexed too: still the same hits
        for needle in needles[:2] + ["seq 1 3000"]:
            if needle.strip():
                both(cat, index, needle)


def test_new_flushes_are_found_at_once_and_indexed_by_the_next_update(tmp_path):
    settings = home(tmp_path)
    archive(settings, events("r0", [("user", "first words", None)], 0, True))
    index, cat = StepIndex(settings), Catalog(settings)
    assert index.update() == 1 and index.pending() == 0
    archive(settings, events("r1", [("assistant", "a fresh zebra", None), ("assistant", "zebra again", '{"z": "zebra"}')],
                             5, True))
    assert index.pending() == 1
    hits = both(cat, index, "ZEBRA")["hits"]  # the new flush is read (pending) before it is indexed
    assert [(h["rollout_id"], h["step_idx"], h["field"]) for h in hits] == [("r1", 0, "content"), ("r1", 1, "content")]
    index.wait()  # the search asked for the update in the background
    assert index.pending() == 0 and not index.errors
    assert [h["step_idx"] for h in both(cat, index, "zebra")["hits"]] == [0, 1]
    assert both(cat, index, '"z"')["hits"][0]["field"] == "tool call"
    # many small updates are merged into one segment
    for k in range(MAX_SEGMENTS + 1):
        archive(settings, events(f"m{k}", [("user", f"word{k} zebra", None)], 10 + k, True))
        index.update()
    segments = sorted(p.name for p in index.root.glob("seg-*"))
    assert len(segments) <= MAX_SEGMENTS and index.pending() == 0
    assert len(both(cat, index, "zebra")["hits"]) == 2 + MAX_SEGMENTS + 1


def test_a_quarantined_or_rewritten_file_is_never_read_from_a_stale_segment(tmp_path):
    settings = home(tmp_path)
    archive(settings, events("r0", [("user", "alpha beta", None)], 0, True))
    archive(settings, events("r1", [("user", "alpha gamma", None)], 1, True))
    index, cat = StepIndex(settings), Catalog(settings)
    index.update()
    assert len(both(cat, index, "alpha")["hits"]) == 2
    gone = next(d for d in list_flushes(settings.archive) if "step" in d.files and
                "gamma" in cat.scalar(f"SELECT content FROM read_parquet('{d.files['step']}')"))
    shutil.move(str(gone.path), str(tmp_path / "quarantined"))  # what `klong archive repair` does with a damaged one
    assert [h["rollout_id"] for h in both(cat, index, "alpha")["hits"]] == ["r0"]
    assert both(cat, index, "gamma")["hits"] == []
    # the same file name with other content (a rewrite): its rows come from the file, not the old segment
    shutil.move(str(tmp_path / "quarantined"), str(gone.path))
    step = gone.files["step"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(step)
    t = t.set_column(t.schema.get_field_index("content"), "content", pa.array(["delta epsilon"] * t.num_rows))
    pq.write_table(t, step)
    assert both(cat, index, "gamma")["hits"] == [] and len(both(cat, index, "epsilon")["hits"]) == 1


@pytest.mark.parametrize("needle", ["'); DROP TABLE steps; --", "$needle", "%", "_", "\\", "' OR 1=1 --", "{\"cmd\"",
                                    "İstanbul", "\u212aelvin", "ΣΑΣ"])
def test_search_text_is_data_never_sql(tmp_path, needle):
    """Found exactly where the text holds it, nothing else touched. "İstanbul" and "ΣΑΣ" find themselves (was:
    the needle lowered by Python, "i̇stanbul", the text by DuckDB, "istanbul": no hit)."""
    settings = home(tmp_path)
    bodies = ["'); DROP TABLE steps; -- and more", "$needle %_ \\ ' OR 1=1 --", '{"cmd": "ls"}', "İstanbul \u212aelvin",
              "ΣΑΣ plain"]
    archive(settings, events("r0", [("user", b, None) for b in bodies], 0, True))
    index, cat = StepIndex(settings), Catalog(settings)
    index.update()
    got = both(cat, index, needle)
    want = [i for i, b in enumerate(bodies) if finder.lower(needle) in finder.lower(b)]
    assert [h["step_idx"] for h in got["hits"]] == want
    assert cat.scalar("SELECT count(*) FROM steps") == len(bodies)  # nothing dropped or changed
