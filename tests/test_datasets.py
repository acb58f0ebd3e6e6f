"""Dataset versions end to end: events -> real broker -> real sink -> Parquet archive -> dataset -> SQL/reader.

Every test produces real events (tests.helpers / the builders of test_materialize) to the session's
Tansu broker, archives them with the real sink and builds with the real CLI or `build_version`.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pyarrow.parquet as pq
import pytest

from consumers.materialize import build_version
from consumers.sink import Sink
from consumers.split import SplitConfig, split_rollout
from store.windows import materialize
from klong.cli import main
from schemas.arrow import encode_array
from schemas.events import JudgeResult, JudgeResultPayload, Step, StepPayload, new_event
from store.catalog import Catalog
from store.datasets import SAMPLES, TOKENS, open_version, version_dir
from tests.helpers import produce, rollout_events
from tests.test_materialize import T0, rollout, task

CFG = {"max_tokens": 1000, "overlap_turns": 1}


def sink(settings) -> None:
    Sink(settings).run(until_idle=True, idle_s=0.3)


def cli(settings, *argv) -> int:
    return main([*argv, "--home", str(settings.home), "--bootstrap-servers", settings.bootstrap_servers,
                 "--topic-prefix", settings.topics.prefix])


def archive_truth(settings, rollout_id: str):
    """(roles, pinned, n_tokens, tokens, logprobs) of one rollout as the archive holds it (SQL views)."""
    cat = Catalog(settings)
    t = cat.arrow(f"SELECT DISTINCT ON (step_idx) step_idx, role, token_ids, logprobs FROM step_tokens "
                  f"WHERE rollout_id = '{rollout_id}' ORDER BY step_idx")
    pins = cat.sql(f"SELECT DISTINCT ON (step_idx) pinned FROM steps WHERE rollout_id = '{rollout_id}' ORDER BY step_idx")
    tokens = [np.asarray(x, np.int32) for x in t.column("token_ids").to_pylist()]
    lps = [None if x is None else np.asarray(x, np.float32) for x in t.column("logprobs").to_pylist()]
    return t.column("role").to_pylist(), np.array(pins["pinned"].to_list()), [len(x) for x in tokens], tokens, lps


def test_cli_build_list_show_diff_and_versions(settings, capsys):
    events = [task("task-a"), task("paper-eval", "eval")]
    for r in range(3):
        events += rollout_events(f"r{r}", 30, seed=r)
    events += rollout_events("e0", 30, seed=7, task_id="paper-eval") + rollout_events("p0", 20, seed=8, end=None)
    produce(settings, events)
    sink(settings)
    home = ["--home", str(settings.home)]
    out = subprocess.run([sys.executable, "-m", "klong", "dataset", "build", "ds", "--kind", "rl", *home,
                          "max_tokens=1000", "overlap_turns=1"], capture_output=True, text=True, check=True)
    assert out.stdout == "ds@1\n" and "built ds@1" in out.stderr
    m1 = json.loads((version_dir(settings.home, "ds", 1) / "manifest.json").read_text())
    assert m1["config"]["max_tokens"] == 1000 and isinstance(m1["config"]["max_tokens"], int)
    assert m1["pending"] == ["p0"] and m1["drops"]["eval_task"] == {"count": 1, "unit": "rollouts"}

    # same input + config: the existing version, said so
    assert cli(settings, "dataset", "build", "ds", "--kind", "rl", "max_tokens=1000", "overlap_turns=1") == 0
    io = capsys.readouterr()
    assert io.out == "ds@1\n" and "up to date" in io.err
    # new events: ds@2
    produce(settings, rollout_events("r3", 30, seed=3))
    sink(settings)
    assert cli(settings, "dataset", "build", "ds", "--kind", "rl", "max_tokens=1000", "overlap_turns=1") == 0
    assert capsys.readouterr().out == "ds@2\n"
    assert cli(settings, "dataset", "diff", "ds@1", "ds@2") == 0
    diff = capsys.readouterr().out
    assert "rollouts added: 1 (r3)" in diff and "samples:" in diff and "config" not in diff
    # another config (a YAML file, an override on top, a flag): ds@3, another hash
    cfg = settings.home / "rl.yaml"
    cfg.write_text("kind: rl\nmax_tokens: 1000\noverlap_turns: 1\n")
    assert cli(settings, "dataset", "build", "ds", "--config", str(cfg), "overlap_turns=2", "--stage", "1") == 0
    assert capsys.readouterr().out == "ds@3\n"
    assert cli(settings, "dataset", "diff", "ds@2", "ds@3") == 0
    diff = capsys.readouterr().out
    assert "config overlap_turns: 1 -> 2" in diff and "config stage: null -> [1]" in diff
    assert cli(settings, "dataset", "show", "ds@2") == 0
    show = capsys.readouterr().out
    assert "pending rollouts: 1 (p0)" in show and "eval_task 1 rollouts" in show and "sha256:" in show
    assert cli(settings, "dataset", "list") == 0
    listing = capsys.readouterr().out
    assert all(f"ds@{n}" in listing for n in (1, 2, 3))

    cat = Catalog(settings)
    hashes = cat.sql("SELECT version, content_hash FROM datasets WHERE dataset = 'ds' ORDER BY version")
    assert hashes["content_hash"].n_unique() == 3
    per = cat.sql("SELECT version, count(*) AS n, max(n_tokens) AS mx, count(DISTINCT rollout_id) AS r "
                  "FROM samples GROUP BY version ORDER BY version")
    assert per["r"].to_list() == [3, 4, 4] and per["mx"].max() <= 1000
    assert cat.scalar("SELECT count(*) FROM samples WHERE rollout_id IN ('e0', 'p0')") == 0
    # errors are named: unknown key, eval task asked for explicitly
    assert cli(settings, "dataset", "build", "ds", "--kind", "rl", "max_tokenz=5") == 2
    assert "max_tokenz" in capsys.readouterr().err
    assert cli(settings, "dataset", "build", "ds", "--kind", "sft", "tasks=[paper-eval]") == 2
    assert "eval task" in capsys.readouterr().err


def test_views_exist_without_datasets(settings):
    cat = Catalog(settings)
    assert cat.scalar("SELECT count(*) FROM samples") == 0 and cat.scalar("SELECT count(*) FROM datasets") == 0
    cols = cat.sql("SELECT * FROM samples LIMIT 0").columns
    assert {"dataset", "version", "rollout_id", "group_id", "window_idx", "first_step", "last_step", "n_tokens",
            "n_loss_tokens", "q", "advantage"} <= set(cols)


def test_samples_view_and_reader_match_the_split_of_the_archive(settings):
    events = [task("task-a")]
    for r in range(3):
        events += rollout_events(f"r{r}", 40, seed=r, group_id="g0", score=0.2 * (r + 1))
    events += rollout_events("short", 6, seed=9, group_id="g1", tokens=(10, 30))  # fits: K = 1
    produce(settings, events)
    sink(settings)
    out = build_version(settings.home, "ds", "rl", CFG)
    cat = Catalog(settings)
    rows = cat.sql("SELECT * FROM samples ORDER BY rollout_id, window_idx").to_dicts()
    assert len(rows) == out.manifest["counts"]["samples"]
    got = {(s.rollout_id, s.window_idx): s for s in open_version(settings.home, out.ref)}
    by_rollout = defaultdict(list)
    for row in rows:
        by_rollout[row["rollout_id"]].append(row)
    adv = defaultdict(float)
    for rid, ws in by_rollout.items():
        roles, pinned, n_tok, tokens, lps = archive_truth(settings, rid)
        res = split_rollout(roles, pinned, n_tok, SplitConfig(**CFG))
        assert [(w.first_step, w.last_step, w.n_tokens, w.n_loss_tokens) for w in res.windows] == \
            [(r["first_step"], r["last_step"], r["n_tokens"], r["n_loss_tokens"]) for r in ws]
        for w in res.windows:
            s = got[(rid, w.window_idx)]
            ids, mask = materialize(res, w, tokens)
            assert np.array_equal(s.input_ids, ids) and np.array_equal(s.loss_mask, mask)
            # behaviour logprobs: the archive's, token for token, on every assistant token of the input
            expect_lp = np.concatenate([lps[st][lo:hi] if lps[st] is not None else np.full(hi - lo, np.nan, np.float32)
                                        for st, lo, hi, _ in np.concatenate([res.prefix_spans, w.spans]).tolist()])
            assert np.array_equal(s.logprobs, expect_lp, equal_nan=True)
            assert s.q == pytest.approx(ws[0]["q"]) and s.policy_version == 0 and s.staleness == 0
            adv[ws[0]["group_id"]] += s.advantage
    assert len(by_rollout["short"]) == 1 and all(r["n_tokens"] <= 1000 for r in rows)
    assert len(by_rollout["r0"]) > 1
    assert all(abs(a) < 1e-9 for a in adv.values())  # eq. 9: advantages sum to 0 over each group
    q = {r["rollout_id"]: r["q"] for r in rows}
    assert q["r0"] == pytest.approx(0.2) and q["r2"] == pytest.approx(0.6)


def test_messy_data_is_counted_not_fatal(settings):
    events = [task("task-a")] + rollout_events("clean", 30, seed=1)
    dup = rollout_events("dup", 30, seed=1)
    events += dup + dup[3:7]  # a producer resend: the same four events twice
    # a second, different step 5 for "dupstep" produced later: the first by produced_at is kept
    dupstep = rollout_events("dupstep", 30, seed=1)
    rng = np.random.default_rng(5)
    other = new_event(Step, rollout_id="dupstep", produced_at=dupstep[6].produced_at + dt.timedelta(seconds=5),
                      payload=StepPayload(step_idx=5, role="assistant", token_ids=encode_array(rng.integers(0, 9, 50), "int32")))
    events += dupstep + [other]
    shuffled = rollout_events("shuffled", 30, seed=1)
    order = np.random.default_rng(0).permutation(len(shuffled))
    events += [shuffled[i] for i in order]  # arrives out of order
    gap = rollout_events("gap", 30, seed=2)
    events += gap[:8] + gap[9:]  # step 7 never arrives
    events += rollout_events("pending", 30, seed=3, end=None)
    events += rollout_events("orphan", 10, seed=3)[1:]  # its rollout_started never arrived
    events.append(new_event(JudgeResult, rollout_id="ghost", payload=JudgeResultPayload(
        request_id="g", step_idx=3, judge_model="m", score=0.9, valid=True)))
    rejudged = rollout_events("rejudged", 30, seed=4, score=None)
    judge = [(0.3, True, 1), (0.8, True, 3), (None, False, 4), (0.1, True, 2)]  # the 0.1 arrives last but is older
    rejudged[-1:-1] = [new_event(JudgeResult, rollout_id="rejudged", produced_at=T0 + dt.timedelta(minutes=t),
                                 payload=JudgeResultPayload(request_id=f"q{t}", step_idx=29, judge_model="m",
                                                            score=s, valid=v)) for s, v, t in judge]
    events += rejudged
    big_prefix, _ = rollout("bigprefix", ["system", "user", "tool", "assistant"], [900, 200, 10, 10], pinned=(0, 1))
    big_turn, _ = rollout("bigturn", ["system", "tool", "assistant", "tool", "assistant"], [100, 10, 950, 10, 10], pinned=(0,))
    events += big_prefix + big_turn
    produce(settings, events)
    sink(settings)

    out = build_version(settings.home, "messy", "rl", CFG)
    m = out.manifest
    drops = {k: v["count"] for k, v in m["drops"].items()}
    assert drops["duplicate_event"] == 4 and drops["duplicate_step"] == 1 and drops["step_gap"] == 1
    assert drops["prefix_too_long"] == 1 and drops["turn_too_long"] == 1 and drops["no_rollout_started"] == 1
    assert drops["judge_unknown_rollout"] == 2  # "ghost", and the orphan's result
    assert m["pending"] == ["pending"]
    samples = {(s.rollout_id, s.window_idx): s for s in open_version(settings.home, out.ref)}
    rids = {r for r, _ in samples}
    assert rids == {"clean", "dup", "dupstep", "shuffled", "rejudged", "bigturn"}
    # duplicates and arrival order change nothing: same tokens, same windows as the clean copy (same seed)
    for rid in ("dup", "dupstep", "shuffled"):
        mine = sorted((k[1], s.input_ids.tobytes()) for k, s in samples.items() if k[0] == rid)
        assert mine == sorted((k[1], s.input_ids.tobytes()) for k, s in samples.items() if k[0] == "clean")
    assert {s.q for k, s in samples.items() if k[0] == "rejudged"} == {0.8}  # latest valid by produced_at
    table = pq.read_table(version_dir(settings.home, "messy", 1) / TOKENS).to_pylist()
    assert len({r["rollout_id"] for r in table}) == len(table) == len(rids)


def test_storage_holds_each_token_once(settings):
    events = [task("task-a")]
    for r in range(4):
        events += rollout_events(f"r{r}", 60, seed=r, group_id=f"g{r % 2}", tokens=(40, 120))
    produce(settings, events)
    sink(settings)
    out = build_version(settings.home, "ds", "rl", {"max_tokens": 600, "overlap_turns": 2})
    path = version_dir(settings.home, "ds", 1)
    samples = pq.read_table(path / SAMPLES).to_pylist()
    tokens = pq.read_table(path / TOKENS)
    unique = 0
    for row in tokens.to_pylist():
        roles, pinned, n_tok, _, _ = archive_truth(settings, row["rollout_id"])
        used = set(range(row["prefix_len"])) | {s for x in samples if x["rollout_id"] == row["rollout_id"]
                                                for s in x["span_step"]}
        unique += sum(n_tok[s] for s in used)
        assert len(row["token_ids"]) == sum(n_tok[s] for s in used)  # prefix once, overlap once
    naive = sum(x["n_tokens"] for x in samples)  # prefix and overlap copied into every window
    assert out.manifest["counts"]["tokens"] == unique and naive > 2 * unique
    stored = (path / TOKENS).stat().st_size + (path / SAMPLES).stat().st_size
    assert stored < 9 * unique  # bytes: ids + logprobs once (int32 + float32), not once per window
