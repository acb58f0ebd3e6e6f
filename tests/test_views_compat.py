"""SQL views over data written by older versions: columns added since read as NULL, nothing fails to bind.

Dataset versions are built with the real builder over an archive written by the sink's own flush code
(tests.test_materialize); an older version is a real samples.parquet with the columns added since
(`span_same_ctx`, `prefix_same_ctx`) dropped. Older `rl_iteration` files are the real archive writer's
tables (`schemas.arrow.to_table` + `store.archive.write_flush`) minus the columns added later: `train_s`
(with the `trained` phase), then `checkpoint`, `train_run`, `reload_s`, `reload_method`.
"""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq

from consumers.materialize import build_version
from schemas.arrow import SCHEMAS, to_table
from schemas.events import RlIteration, RlIterationPayload, decode, encode, new_event
from store.archive import write_flush
from store.catalog import Catalog
from store.dataset_views import SAMPLES_VIEW_COLUMNS
from store.datasets import SAMPLES, version_dir
from tests.test_import_interop import tiny_chat_dir  # noqa: F401 (a fixture)
from tests.test_materialize import ROLES, T0, archive, home_settings, rollout, task

SAME_CTX = ["span_same_ctx", "prefix_same_ctx"]  # samples.parquet columns added by 4f2a0ef
RELOAD = ["checkpoint", "train_run", "reload_s", "reload_method"]  # rl_iteration columns added by c5270c5
TRAIN_S = ["train_s"]  # added with the `trained` phase (37b0061)


def build(settings, name: str = "d") -> pa.Table:
    """Builds a version of `name` from the archive; returns its samples.parquet as written."""
    out = build_version(settings.home, name, "rl", {"max_tokens": 200, "overlap_turns": 1})
    return pq.read_table(version_dir(settings.home, name, int(out.ref.split("@")[1])) / SAMPLES)


def test_samples_view_reads_versions_from_before_the_same_ctx_columns(tmp_path):
    s = home_settings(tmp_path)
    evs = [task("task-a")]
    for r in range(4):
        evs += rollout(f"r{r}", ROLES, [30, 20] + [15, 10] * 6, pinned=(0, 1), seed=r, score=0.2 * (r + 1))[0]
    archive(s, evs)
    cat = Catalog(s)
    empty_columns = cat.arrow("SELECT * FROM samples").schema
    assert empty_columns.names == ["dataset", "version", *SAMPLES_VIEW_COLUMNS]

    current = build(s, "old")
    assert current.column("prefix_same_ctx").null_count == 0  # the builder fills it: NULL below means "not written"
    path = version_dir(s.home, "old", 1) / SAMPLES
    pq.write_table(current.drop_columns(SAME_CTX), path)  # old@1 now as a version written before the columns

    only_old = cat.arrow("SELECT * FROM samples ORDER BY rollout_id, window_idx")
    assert only_old.schema == empty_columns  # same columns and types as with no dataset at all
    assert only_old.num_rows == current.num_rows and only_old.column("prefix_same_ctx").null_count == current.num_rows

    build(s, "new")  # new@1: the current format, from the same events
    per_version = cat.arrow("SELECT dataset, version, count(*) AS n, count(prefix_same_ctx) AS known FROM samples "
                            "GROUP BY ALL ORDER BY dataset").to_pylist()
    assert per_version == [{"dataset": "new", "version": 1, "n": current.num_rows, "known": current.num_rows},
                           {"dataset": "old", "version": 1, "n": current.num_rows, "known": 0}]
    rest = "* EXCLUDE (dataset, prefix_same_ctx)"
    old, new = (cat.arrow(f"SELECT {rest} FROM samples WHERE dataset = '{d}' ORDER BY rollout_id, window_idx")
                for d in ("old", "new"))
    assert old.num_rows and old.equals(new)  # every other column reads the same from both formats


def rl_event(phase: str, iteration: int, minute: int, **kw) -> RlIteration:
    return new_event(RlIteration, produced_at=T0 + dt.timedelta(minutes=minute), payload=RlIterationPayload(
        plan="p", run_id="run-1", phase=phase, stage=1, iteration=iteration, policy_version=iteration - 1, **kw))


def archive_rl(settings, start: int, events, drop=()) -> None:
    """One flush of rl_iteration events as the sink writes it, minus the columns `drop` (an older writer)."""
    topic = settings.topics.for_event(events[0])
    table, bad = to_table("rl_iteration", [(decode(encode(ev)), topic, 0, start + i) for i, ev in enumerate(events)])
    assert not bad
    write_flush(settings.archive_dir, topic, "t0", 0, start, start + len(events) - 1,
                {"rl_iteration": table.drop_columns(list(drop))})


ITERATION_COLUMNS = ("iteration, phase, started, not_started, queued, dataset, build_s, train_s, checkpoint, "
                     "train_run, reload_s, reload_method")


def test_rl_iterations_reads_files_from_before_the_train_and_reload_columns(tmp_path):
    s = home_settings(tmp_path)
    archive_rl(s, 0, [rl_event("started", 1, 0, rollouts=["a", "b"]),
                      rl_event("closed", 1, 5, not_started=["b"], rolling_s=300.0),
                      rl_event("dataset_built", 1, 6, dataset="d@1", n_samples=3, build_s=2.0)],
               drop=TRAIN_S + RELOAD)  # the first rl_iteration format
    archive_rl(s, 3, [rl_event("trained", 1, 7, train_s=4.0)], drop=RELOAD)  # the train hook's format
    cat = Catalog(s)
    assert cat.arrow("SELECT * FROM rl_iteration_events").schema.names == SCHEMAS["rl_iteration"].names
    it1 = {"iteration": 1, "phase": "trained", "started": 1, "not_started": 1, "queued": 1, "dataset": "d@1",
           "build_s": 2.0, "train_s": 4.0, "checkpoint": None, "train_run": None, "reload_s": None,
           "reload_method": None}
    assert cat.arrow(f"SELECT {ITERATION_COLUMNS} FROM rl_iterations").to_pylist() == [it1]
    assert cat.arrow("SELECT rollout_id, status FROM rl_rollouts ORDER BY rollout_id").to_pylist() == [
        {"rollout_id": "a", "status": "queued"}]

    archive_rl(s, 4, [rl_event("started", 2, 10, rollouts=["c"]), rl_event("closed", 2, 15),
                      rl_event("dataset_built", 2, 16, dataset="d@2", n_samples=1, build_s=1.0),
                      rl_event("trained", 2, 17, train_s=3.0, checkpoint="ck/2", train_run="tr-2", reload_s=1.5,
                               reload_method="reload")])  # the current format
    it2 = {"iteration": 2, "phase": "trained", "started": 1, "not_started": 0, "queued": 1, "dataset": "d@2",
           "build_s": 1.0, "train_s": 3.0, "checkpoint": "ck/2", "train_run": "tr-2", "reload_s": 1.5,
           "reload_method": "reload"}
    assert cat.arrow(f"SELECT {ITERATION_COLUMNS} FROM rl_iterations ORDER BY iteration").to_pylist() == [it1, it2]



def test_rollout_started_files_from_before_the_tools_column(tmp_path, tiny_chat_dir):
    """rollout_started files written before the `tools` field: `tools` reads NULL in SQL, and a build with
    tokenizer=MODEL_DIR renders their text-only rollouts without a tools block (nothing fails to bind)."""
    from core.chat import ChatTokenizer
    from schemas.events import event_type
    from trainer.data import DatasetReader

    s = home_settings(tmp_path / "home")
    evs, _ = rollout("old", ROLES[:4], [3] * 4, text_only=range(4))
    by_type: dict = {}
    for n, ev in enumerate([task("task-a")] + evs):
        ev = decode(encode(ev))
        by_type.setdefault(event_type(ev), []).append((ev, "t.rollouts", 0, n))
    tables = {t: to_table(t, items)[0] for t, items in by_type.items()}
    tables["rollout_started"] = tables["rollout_started"].drop_columns(["tools"])  # the older format
    write_flush(s.archive_dir, "t.rollouts", "t0", 0, 0, len(evs), tables)
    cat = Catalog(s)
    assert cat.arrow("SELECT rollout_id, tools FROM rollout_started_events").to_pylist() == [
        {"rollout_id": "old", "tools": None}]
    out = build_version(s.home, "old", "sft", {"tokenizer": str(tiny_chat_dir), "max_tokens": 4096})
    text = ChatTokenizer(tiny_chat_dir).decode(DatasetReader(s.home, out.ref).sample(0)[0])
    assert text.startswith("<|im_start|>system\n") and "<tools>" not in text
