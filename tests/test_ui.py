"""`klong ui` in a real browser (headless Chromium driven by Playwright) and `klong report`, on one data home
made by the real parts (tests/ui_data.py: a two-stage RL plan with carry-overs, judge trees, a blacklist hit,
datasets with several windows per rollout, a training run). One `klong ui` process and one browser serve
every test of the module. What the pages and figures show is checked against SQL over the same archive."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from services.broker import ensure_topics, free_port
from klong.cli import main
from core.settings import Settings, Topics
from store.catalog import Catalog, sql_str
from ui.report import FIGURES, series, write_report
from ui.viewer import HEAD_CHARS, TAIL_CHARS
from tests.test_tasks import klong
from tests.ui_data import BLACKLISTED, build_plan_home

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]
ROOT = Path(__file__).resolve().parents[1]
# Playwright's wait for a page or an element: beside a busy suite on 2 cores (two busy loops) the plots page
# once took over 30 s to draw, so 5x that
BROWSER_TIMEOUT_MS = 150_000
FIRST_STEPS = 10  # steps rendered with a rollout page (the rest are fetched by its script): the test rollouts have more


@pytest.fixture(scope="module")
def data(broker, tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    settings = Settings(home=root / "home", bootstrap_servers=broker.bootstrap,
                        topics=Topics(f"t{uuid.uuid4().hex[:10]}"), partitions=4)
    settings.home.mkdir(parents=True)
    ensure_topics(settings)
    ids = build_plan_home(settings, root)
    return settings, ids, Catalog(settings)


@pytest.fixture(scope="module")
def server(data):
    """`klong ui` as its own process, as a user starts it."""
    settings = data[0]
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "klong", "ui", "--port", str(port), "--home", str(settings.home),
                             "--first-steps", str(FIRST_STEPS)],
                            cwd=settings.home, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:  # until the server answers (or the process dies)
        try:
            with urllib.request.urlopen(url + "/static/ui.css", timeout=5):
                break
        except OSError:
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "klong ui did not answer within 90 s"
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(accept_downloads=True, viewport={"width": 1400, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(BROWSER_TIMEOUT_MS)
    yield pg
    context.close()


def rows(cat: Catalog, query: str) -> list[dict]:
    return cat.arrow(query).to_pylist()


def open_rollout(page, server: str, rollout_id: str) -> None:
    """Opens a rollout page and waits until its script has appended the steps after the first FIRST_STEPS."""
    page.goto(f"{server}/rollouts/{rollout_id}")
    page.wait_for_selector("#conversation[data-complete='1']", state="attached")


def test_rollouts_list_filters_and_sorts(data, server, page):
    _, ids, cat = data
    page.goto(server + "/")
    links = page.locator("#rollouts tbody tr td:first-child a")
    assert sorted(links.all_text_contents()) == sorted(ids["rollouts"])
    live = {i for r in rows(cat, "SELECT iteration, last_iteration FROM rollouts") for i in r.values()}
    assert page.locator("select[name=iteration] option").all_text_contents() == ["any", *map(str, sorted(live))]

    page.select_option("select[name=task]", "ta")
    page.select_option("select[name=status]", "finished")
    page.click("#filters button[type=submit]")
    page.wait_for_url("**task=ta**")
    want = [r["rollout_id"] for r in rows(cat, "SELECT rollout_id FROM rollouts WHERE task_id = 'ta' AND status = 'finished'")]
    assert sorted(links.all_text_contents()) == sorted(want) and len(want) == 6

    page.click("a.sort[data-col=n_steps]")  # first click: descending, second: ascending
    page.wait_for_url("**sort=n_steps**")
    by_steps = rows(cat, "SELECT rollout_id FROM rollouts WHERE task_id = 'ta' AND status = 'finished' "
                         "ORDER BY n_steps DESC, rollout_id")
    assert links.all_text_contents() == [r["rollout_id"] for r in by_steps]
    page.click("a.sort[data-col=n_steps]")
    page.wait_for_url("**desc=0**")
    ascending = rows(cat, "SELECT rollout_id FROM rollouts WHERE task_id = 'ta' AND status = 'finished' "
                          "ORDER BY n_steps, rollout_id")
    assert links.all_text_contents() == [r["rollout_id"] for r in ascending]

    page.goto(server + "/?iteration=2&min_score=0.6")  # live in iteration 2 (started, carried in or ended there)
    want = rows(cat, "SELECT rollout_id FROM rollouts WHERE 2 BETWEEN iteration AND last_iteration AND final_score >= 0.6")
    assert sorted(links.all_text_contents()) == sorted(r["rollout_id"] for r in want) and want
    page.goto(server + "/?stage=x")
    assert "bad filter value 'x'" in page.locator("#error").text_content()


def test_ui_on_a_taken_port_says_so(data, server, capsys):
    port = server.rsplit(":", 1)[1]
    assert main(klong(data[0], "ui", "--port", port)) == 2
    assert f"cannot serve on 127.0.0.1:{port}: Address already in use (pick another --port)" in capsys.readouterr().err


def test_rollout_as_a_conversation_with_prefix_tool_calls_timing_and_an_expanded_output(data, server, page):
    _, ids, cat = data
    rid = ids["long"]
    steps = rows(cat, f"SELECT step_idx, role, content, tool_name, tool_arguments, pinned, elapsed_s FROM steps "
                      f"WHERE rollout_id = {sql_str(rid)} ORDER BY step_idx")
    with urllib.request.urlopen(f"{server}/rollouts/{rid}") as r:  # the page itself holds the first steps only
        html = r.read().decode()
    assert html.count('<div class="step ') == FIRST_STEPS < len(steps) and 'id="more"' in html
    open_rollout(page, server, rid)
    assert page.locator("#conversation .step").count() == len(steps) and page.locator("#more").count() == 0
    prefix = 1 + max(s["step_idx"] for s in steps if s["pinned"])
    assert page.locator(".step.prefix").count() == prefix
    assert "end of the pinned prefix" in page.locator("#prefix-end").text_content()
    for s in steps:
        assert page.locator(f"#s-{s['step_idx']} .role").text_content().lower() == s["role"]
        assert f"t={s['elapsed_s']:.1f}s" in page.locator(f"#s-{s['step_idx']} .t").text_content()
    calls = [s for s in steps if s["tool_name"]]
    assert page.locator(".step .call").count() == len(calls)
    seq = next(s for s in calls if "seq 1 3000" in s["tool_arguments"])
    assert "seq 1 3000" in page.locator(f"#s-{seq['step_idx']} .call").text_content()

    out = steps[seq["step_idx"] + 1]  # its output: 3000 lines, shown as head ... tail until expanded
    assert out["role"] == "tool" and len(out["content"]) > 10_000
    box = page.locator(f"#s-{out['step_idx']}")
    assert "\n1500\n" not in box.text_content() and box.locator("pre.full").count() == 0
    assert box.locator("pre.body").first.text_content() == out["content"][:HEAD_CHARS]
    assert box.locator("pre.tail").text_content() == out["content"][-TAIL_CHARS:]
    box.locator("button.expand").click()
    assert box.locator("pre.full").text_content() == out["content"]
    assert box.locator("button.expand").count() == 0

    markup = next(s for s in steps if s["role"] == "tool" and "<script>" in s["content"])  # contents are text, never HTML
    assert page.locator(f"#s-{markup['step_idx']} pre.body").text_content() == markup["content"]
    assert page.evaluate("window.pwned") is None and page.locator("#conversation pre b").count() == 0


def test_carry_overs_and_policy_versions_are_marked(data, server, page):
    _, ids, cat = data
    rid = ids["rollouts"][0]  # the slow one: carried over while it ran
    resumes = rows(cat, f"SELECT iteration, policy_version, next_step_idx FROM rollout_resumes "
                        f"WHERE rollout_id = {sql_str(rid)} ORDER BY next_step_idx")
    assert resumes
    open_rollout(page, server, rid)
    assert page.locator(".marker.carry").count() == len(resumes)
    for r in resumes:
        text = page.locator(f"#carry-{r['next_step_idx']}").text_content()
        assert f"iteration {r['iteration']}" in text and f"policy v{r['policy_version']}" in text
        assert page.locator(f"#s-{r['next_step_idx']} .pv").text_content() == f"v{r['policy_version']}"


def test_dataset_overlay_windows_truncations_and_drops(data, server, page):
    settings, ids, cat = data
    rid = ids["long"]
    refs = [r["ref"] for r in rows(cat, "SELECT dataset || '@' || version AS ref FROM samples "
                                        f"WHERE rollout_id = {sql_str(rid)} GROUP BY 1")]
    assert len(refs) == 1
    ref = refs[0]
    wins = rows(cat, f"SELECT window_idx, first_turn, last_turn, first_step, last_step, n_tokens, n_loss_tokens, q, "
                     f"advantage, obs_truncated FROM samples WHERE rollout_id = {sql_str(rid)} "
                     f"AND dataset || '@' || version = {sql_str(ref)} ORDER BY window_idx")
    open_rollout(page, server, rid)
    page.select_option("#overlay-select", ref)
    page.wait_for_selector("#windows tr.window")
    shown = [r.locator("td").all_text_contents() for r in page.locator("#windows tr.window").all()]
    assert shown == [[str(w["window_idx"]), f"{w['first_turn']}–{w['last_turn']}", f"{w['first_step']}–{w['last_step']}",
                      str(w["n_tokens"]), str(w["n_loss_tokens"]), f"{w['q']:.3f}", f"{w['advantage']:.3f}",
                      "yes" if w["obs_truncated"] else ""] for w in wins]
    assert "w0" in page.locator(f"#ov-{wins[0]['first_step']}").text_content()
    # the oversized action (and its observation) is in no window: dropped, with the reason
    huge = rows(cat, f"SELECT step_idx FROM steps WHERE rollout_id = {sql_str(rid)} AND length(tool_arguments) > 5000")
    assert "dropped: turn_too_long" in page.locator(f"#ov-{huge[0]['step_idx']}").text_content()
    # a window cut to fit (obs_truncated) holds a step marked truncated; such a window is exactly max_tokens long
    for w in (w for w in wins if w["obs_truncated"]):
        assert w["n_tokens"] == 8000
        chips = [page.locator(f"#ov-{i}").text_content() for i in range(w["first_step"], w["last_step"] + 1)]
        assert any("truncated: kept the last" in c for c in chips)
    page.locator("#windows tr.window").last.click()
    assert "in-window" in page.locator(f"#s-{wins[-1]['last_step']}").get_attribute("class")

    other = next(r["ref"] for r in rows(cat, "SELECT dataset || '@' || version AS ref FROM datasets") if r["ref"] != ref)
    page.select_option("#overlay-select", other)
    page.wait_for_function(f"document.getElementById('overlay-info').dataset.ref === '{other}'")
    assert "left this rollout out" in page.locator("#overlay-info").text_content()
    assert page.locator("#windows tr.window").count() == 0 and page.locator(".chip").count() == 0


def test_judge_result_as_a_rubric_tree_with_weights_leaf_scores_and_explanations(data, server, page):
    _, ids, cat = data
    rid = rows(cat, "SELECT rollout_id FROM rollouts WHERE task_id = 'ta' AND n_judged > 0 LIMIT 1")[0]["rollout_id"]
    result = rows(cat, f"SELECT request_id, score FROM judge_results WHERE rollout_id = {sql_str(rid)} AND valid")[-1]
    leaves = {r["leaf_id"]: r for r in rows(cat, "SELECT leaf_id, score, explanation FROM judge_leaf_scores "
                                                 f"WHERE request_id = {sql_str(result['request_id'])}")}
    nodes = {r["node_id"]: r for r in rows(cat, "SELECT node_id, parent_id, weight, requirements, is_leaf "
                                                "FROM rubric_nodes WHERE task_id = 'ta'")}
    open_rollout(page, server, rid)
    root = page.locator(f"details.judge[data-request='{result['request_id']}'] > ul.tree > li")
    assert root.locator(":scope > .score").text_content() == f"{result['score']:.2f}"

    def read(li) -> dict:  # the tree as the page shows it
        kids = [read(c) for c in li.locator(":scope > ul > li").all()]
        expl = li.locator(":scope > .explanation")
        return {"req": li.locator(":scope > .req").text_content(), "score": float(li.locator(":scope > .score").text_content()),
                "weight": float(li.locator(":scope > .weight").text_content().lstrip("×")), "kids": kids,
                "explanation": expl.text_content() if expl.count() else None}

    tree = read(root)
    by_req = {n["requirements"]: n for n in nodes.values()}

    def check(n: dict) -> float:
        node = by_req[n["req"]]
        assert n["weight"] == node["weight"]
        if not n["kids"]:
            leaf = leaves[node["node_id"]]
            assert n["score"] == leaf["score"] and n["explanation"] == leaf["explanation"]
            return leaf["score"]
        want = sum(k["weight"] * check(k) for k in n["kids"]) / sum(k["weight"] for k in n["kids"])
        assert n["score"] == pytest.approx(want, abs=0.005)  # parent = weighted mean of its children (2 decimals)
        return want

    assert check(tree) == pytest.approx(result["score"])
    assert len(tree["kids"]) == 2 and len(tree["kids"][0]["kids"]) == 2  # ta: a section of two leaves, and a leaf


def test_blacklist_hits_sql_box_csv_and_plots(data, server, page):
    _, ids, cat = data
    hits = rows(cat, "SELECT rollout_id, step_idx FROM blacklist_hits ORDER BY step_idx")
    assert hits and {h["rollout_id"] for h in hits} == {ids["leaky"]}
    page.goto(server + "/blacklist")
    assert page.locator("#hits tbody tr").count() == len(hits) and BLACKLISTED in page.locator("#hits").text_content()
    open_rollout(page, server, ids['leaky'])
    assert page.locator(".step.hit").count() == len({h["step_idx"] for h in hits})
    assert BLACKLISTED in page.locator("#hits").text_content()

    query = "SELECT task_id, count(*) AS n, avg(n_steps) AS steps FROM rollouts GROUP BY 1 ORDER BY 1"
    page.goto(server + "/sql")
    page.fill("#q", query)
    page.click("#run")
    page.wait_for_selector("#result")
    want = rows(cat, query)
    assert [r.locator("td").all_text_contents()[:2] for r in page.locator("#result tbody tr").all()] == \
        [[w["task_id"], str(w["n"])] for w in want]
    with page.expect_download() as download:
        page.click("#csv")
    csv = Path(download.value.path()).read_text()
    assert csv.splitlines() == ["task_id,n,steps"] + [f"{w['task_id']},{w['n']},{w['steps']}" for w in want]
    assert "\r" not in csv
    page.fill("#q", "DELETE FROM rollouts")
    page.click("#run")
    assert "read-only" in page.locator("#error").text_content()
    page.fill("#q", "SELECT * FROM read_csv('/etc/passwd')")  # the box reads the archive only, no other file
    page.click("#run")
    assert "/etc/passwd" in page.locator("#error").text_content() and page.locator("#result").count() == 0

    page.goto(server + "/plots?plan=ui-plan")
    page.wait_for_selector("#figures[data-drawn='1']", state="attached")
    assert page.locator("figure").count() == len(FIGURES)


def test_report_writes_every_figure_and_plots_what_sql_says(data, tmp_path, capsys):
    settings, ids, cat = data
    out = tmp_path / "report"
    assert main(klong(settings, "report", "--plan", "ui-plan", "-o", str(out))) == 0
    assert capsys.readouterr().out.split() == [str(out / f"{name}.png") for name in FIGURES]
    for name in FIGURES:
        data_ = (out / f"{name}.png").read_bytes()
        assert data_[:8] == b"\x89PNG\r\n\x1a\n" and len(data_) > 10_000

    # stages and RL curves: per (stage, iteration ended in), from the plan's rollouts, aggregated here in Python
    plan_rollouts = rows(cat, "SELECT r.* FROM rollouts r JOIN rl_rollouts p USING (rollout_id) WHERE p.plan = 'ui-plan'")
    assert len(plan_rollouts) == 12
    groups = defaultdict(list)
    for r in plan_rollouts:
        groups[(r["stage"], r["last_iteration"])].append(r)
    got = series("stages", cat, "ui-plan")
    assert list(zip(got["stage"], got["iteration"])) == sorted(groups)
    for k, key in enumerate(sorted(groups)):
        g = groups[key]
        assert got["rollouts"][k] == len(g)
        assert got["turns"][k] == pytest.approx(np.mean([r["n_turns"] for r in g]))
        assert got["hours"][k] == pytest.approx(np.mean([r["elapsed_s"] for r in g]) / 3600)
        assert got["score"][k] == pytest.approx(np.mean([r["final_score"] for r in g]))
    rl = series("rl_curves", cat, "ui-plan")
    assert rl["iteration"] == [1, 2, 3]
    lps = rows(cat, "SELECT rollout_id, logprobs FROM step_tokens WHERE role = 'assistant'")
    last_it = {r["rollout_id"]: r["last_iteration"] for r in plan_rollouts}
    for k, it in enumerate(rl["iteration"]):
        mine = [r for r in plan_rollouts if r["last_iteration"] == it]
        assert rl["score"][k] == pytest.approx(np.mean([r["final_score"] for r in mine]))
        assert rl["turns"][k] == pytest.approx(np.mean([r["n_turns"] for r in mine]))
        tokens = np.concatenate([r["logprobs"] for r in lps if last_it.get(r["rollout_id"]) == it]).astype(np.float64)
        assert rl["entropy"][k] == pytest.approx(float(-np.nanmean(tokens)), rel=1e-5)  # NaN: template ids

    # training: the loss of the run trained on the plan's last dataset, step by step
    loss = rows(cat, "SELECT step, value FROM training_metrics WHERE metric = 'loss' ORDER BY step")
    tr = series("training", cat, "ui-plan")
    assert [(s, v) for m, s, v in zip(tr["metric"], tr["step"], tr["value"]) if m == "loss"] == \
        [(r["step"], r["value"]) for r in loss] and len(loss) == 2

    # windows: K and window lengths per rollout of each of the plan's dataset versions
    samples = rows(cat, "SELECT dataset || '@' || version AS ref, rollout_id, window_idx, n_tokens FROM samples "
                        "WHERE dataset = 'ui-rl' ORDER BY window_idx")
    per = defaultdict(list)
    for s in samples:
        per[(s["ref"], s["rollout_id"])].append(s["n_tokens"])
    w = series("windows", cat, "ui-plan")
    assert {(r, i): (k, lengths) for r, i, k, lengths in zip(w["ref"], w["rollout_id"], w["k"], w["lengths"])} == \
        {key: (len(v), v) for key, v in per.items()}
    assert max(w["k"]) > 1

    assert main(klong(settings, "report", "--plan", "nope", "-o", str(tmp_path / "x"))) == 2
    assert "no plan 'nope' in the archive (plans: ui-plan)" in capsys.readouterr().err
    # without a plan: every ended rollout, and the latest version of each dataset
    everything = series("stages", cat)
    assert sum(everything["rollouts"]) == cat.scalar("SELECT count(*) FROM rollouts WHERE status <> 'running'")
    assert set(series("windows", cat)["ref"]) == {"ui-rl@3"}
    # an empty home: every figure still written (saying there is no data yet)
    (tmp_path / "empty").mkdir()
    empty = Catalog(Settings(home=tmp_path / "empty", bootstrap_servers=settings.bootstrap_servers))
    assert [p.name for p in write_report(empty, tmp_path / "empty-report")] == [f"{n}.png" for n in FIGURES]


# ---- finding things: search, groups, tokens, keys, paging, rubric leaves not graded, plots -----------------------


def test_search_over_all_rollouts_or_one_opens_the_step_with_its_collapsed_middle(data, server, page):
    _, ids, cat = data
    want = rows(cat, "SELECT DISTINCT rollout_id, step_idx FROM steps WHERE contains(lower(content), 'seq 1 3000') "
                     "OR contains(lower(tool_arguments), 'seq 1 3000')")
    page.goto(server + "/search?q=SEQ+1+3000")  # any case
    got = [(r.locator("td").nth(0).text_content(), int(r.locator("td").nth(1).text_content()))
           for r in page.locator("#hits tr.hit").all()]
    assert sorted(got) == sorted((w["rollout_id"], w["step_idx"]) for w in want) and len(got) > 3
    assert page.locator("#hits mark").first.text_content().lower() == "seq 1 3000"

    rid = ids["long"]  # "1499" sits in the middle of a 3,000-line output the page shows collapsed
    mid = rows(cat, f"SELECT step_idx FROM steps WHERE rollout_id = {sql_str(rid)} AND contains(content, '\n1499\n') "
                    "ORDER BY step_idx")
    page.goto(server + "/")
    page.fill("#navq", "1499")
    page.press("#navq", "Enter")
    page.wait_for_selector("#hits")
    page.fill("#searchform input[name=rollout]", rid)
    page.click("#searchform button[type=submit]")
    page.wait_for_url("**rollout=**")
    hits = page.locator("#hits tr.hit")
    assert [int(h.locator("td").nth(1).text_content()) for h in hits.all()] == [m["step_idx"] for m in mid]
    assert {h.locator("td").nth(0).text_content() for h in hits.all()} == {rid}
    hits.first.locator("a.open").click()
    page.wait_for_selector("#conversation[data-complete='1']", state="attached")
    box = page.locator(f"#s-{mid[0]['step_idx']}")
    box.locator("pre.full").wait_for()  # expanded: the match is in the middle the page had left out
    assert box.locator("mark").first.text_content() == "1499"

    page.goto(server + "/search?q=no+such+text+anywhere")
    assert "no step contains" in page.locator("#count").text_content()


def test_filter_by_group_and_the_group_page_side_by_side(data, server, page):
    _, ids, cat = data
    gid = rows(cat, f"SELECT group_id FROM rollouts WHERE rollout_id = {sql_str(ids['long'])}")[0]["group_id"]
    members = rows(cat, f"SELECT rollout_id, final_score, n_turns, n_steps FROM rollouts WHERE group_id = {sql_str(gid)} "
                        "ORDER BY final_score DESC NULLS LAST, n_turns, rollout_id")
    assert len(members) >= 2
    page.goto(server + "/")
    page.fill("#filters input[name=group]", gid)
    page.click("#filters button[type=submit]")
    page.wait_for_url("**group=**")
    assert sorted(page.locator("#rollouts tbody td.id:first-child a").all_text_contents()) == \
        sorted(m["rollout_id"] for m in members)
    page.locator("#rollouts a.grp").first.click()
    page.wait_for_selector("#group")
    cols = page.locator("#group th.rcol")
    assert [c.get_attribute("data-rollout") for c in cols.all()] == [m["rollout_id"] for m in members]
    for c, m in zip(cols.all(), members):
        assert c.locator(".score").text_content() == (f"{m['final_score']:.3f}" if m["final_score"] is not None else "–")
        assert int(c.locator(".turns").text_content()) == m["n_turns"]
        assert int(c.locator(".nsteps").text_content()) == m["n_steps"]
    # where they diverge: the first step whose role, content or tool call differs between the rollouts
    steps = rows(cat, "SELECT rollout_id, step_idx, role, content, tool_name, tool_arguments FROM steps "
                      f"WHERE rollout_id IN (SELECT rollout_id FROM rollouts WHERE group_id = {sql_str(gid)})")
    by = defaultdict(dict)
    for s in steps:
        by[s["rollout_id"]][s["step_idx"]] = (s["role"], s["content"], s["tool_name"], s["tool_arguments"])
    common = 0
    while all(common in by[m["rollout_id"]] for m in members) and \
            len({by[m["rollout_id"]][common] for m in members}) == 1:
        common += 1
    assert common > 0 and int(page.locator("#common").get_attribute("data-common")) == common
    assert page.locator(f"#g-{common}").get_attribute("class").split() == ["srow", "differs"]
    assert page.locator(f"#g-{common - 1}").count() == 0  # the shared steps are hidden


def test_token_view_colours_logprobs_and_shows_a_windows_loss_mask(data, server, page):
    settings, ids, cat = data
    from ui.tokens import step_tokens

    rid = ids["long"]
    step = rows(cat, f"SELECT step_idx, token_ids, logprobs FROM step_tokens WHERE rollout_id = {sql_str(rid)} "
                     "AND role = 'assistant' ORDER BY step_idx LIMIT 1")[0]
    open_rollout(page, server, rid)
    page.locator(f"#s-{step['step_idx']} a.toklink").click()
    page.wait_for_selector("#tokens")
    toks = page.locator("#tokens .tk")
    assert toks.count() == len(step["token_ids"])
    shown = page.evaluate("Array.from(document.querySelectorAll('#tokens .tk')).map(t => "
                          "[+t.dataset.id, t.dataset.lp === undefined ? null : +t.dataset.lp])")
    assert [s[0] for s in shown] == step["token_ids"]
    for (_, lp), want in zip(shown, step["logprobs"]):
        assert (lp is None) == (want is None or np.isnan(want)) and (lp is None or lp == pytest.approx(want, abs=1e-4))
    assert page.locator("#maskinfo").count() == 0

    window = rows(cat, f"SELECT dataset || '@' || version AS ref, window_idx, first_step, last_step, n_loss_tokens "
                       f"FROM samples WHERE rollout_id = {sql_str(rid)} AND first_step <= {step['step_idx']} "
                       f"AND {step['step_idx']} <= last_step ORDER BY dataset, version DESC, window_idx LIMIT 1")
    w = window[0] if window else None
    if w is None:  # the step is in the prefix: every window holds it
        w = rows(cat, f"SELECT dataset || '@' || version AS ref, window_idx, first_step, last_step, n_loss_tokens "
                      f"FROM samples WHERE rollout_id = {sql_str(rid)} ORDER BY dataset, version DESC LIMIT 1")[0]
    page.select_option("#winselect", f"{w['ref']}#{w['window_idx']}")
    page.wait_for_selector("#maskinfo")
    loss = page.locator("#tokens .tk.loss").count()
    assert page.locator("#maskinfo b").text_content() == str(loss) and loss > 0
    # the mask is the dataset's: over every step the window holds, the view's loss tokens add up to the window's
    held = [r["step_idx"] for r in rows(cat, f"SELECT step_idx FROM steps WHERE rollout_id = {sql_str(rid)} "
                                             f"AND step_idx <= {w['last_step']}")]
    total = 0
    for s in held:
        try:
            tv = step_tokens(cat, rid, s, home=settings.home, ref=w["ref"], window=w["window_idx"])
        except Exception:  # not in this window (before it, or dropped)
            continue
        total += tv["mask"]["loss"]
    assert total == w["n_loss_tokens"]


def test_keyboard_j_k_steps_and_n_p_rollouts(data, server, page):
    page.goto(server + "/?n=5")
    links = page.locator("#rollouts tbody td.id:first-child a")
    hrefs = [a.get_attribute("href") for a in links.all()]
    page.keyboard.press("j")
    page.keyboard.press("j")
    page.keyboard.press("Enter")
    page.wait_for_selector("#conversation[data-complete='1']", state="attached")
    assert page.url.endswith(hrefs[1])
    for key, want in (("j", "#s-0"), ("j", "#s-1"), ("j", "#s-2"), ("k", "#s-1")):
        page.keyboard.press(key)
        assert page.evaluate("location.hash") == want
    page.keyboard.press("n")
    page.wait_for_url("**" + hrefs[2])
    page.wait_for_selector("#conversation")
    page.keyboard.press("p")
    page.wait_for_url("**" + hrefs[1])


def test_the_list_is_paged_and_fits_1400_px(data, server, page):
    _, ids, cat = data
    page.goto(server + "/")
    assert page.evaluate("document.documentElement.scrollWidth") <= 1400
    seen = []
    page.goto(server + "/?n=5&sort=rollout_id&desc=0")
    while True:
        seen += page.locator("#rollouts tbody td.id:first-child a").all_text_contents()
        assert page.evaluate("document.documentElement.scrollWidth") <= 1400
        if page.locator("#nextpage").count() == 0:
            break
        page.click("#nextpage")
        page.wait_for_load_state("load")
    assert seen == sorted(ids["rollouts"]) and len(seen) > 5
    assert page.locator("#count").text_content().startswith(f"11–{len(seen)} of {len(seen)} rollouts")


def test_a_leaf_not_graded_is_not_a_zero_and_the_root_is_the_judges_score(data, server, page, tmp_path):
    settings, ids, cat = data
    from consumers.sink import Sink
    from producers.tasks import import_tasks
    from tests.test_rubric import leaf, parent
    from tests.test_tasks import make_task
    from tests.ui_data import BLACKLISTED, PAPER

    r = rows(cat, "SELECT rollout_id, request_id, score FROM judge_results WHERE task_id = 'tb' AND valid "
                  "ORDER BY produced_at LIMIT 1")[0]
    # the rubric gains a leaf after the judgement: that leaf was never graded
    make_task(tmp_path, "tb", paper=PAPER, blacklist=BLACKLISTED + "\n", rubric=parent("tb", [
        leaf("good [score=1]"), leaf("bad [score=0]"), leaf("added later", weight=3)]))
    import_tasks(settings, [tmp_path / "tb"], "train")
    Sink(settings).run(until_idle=True)
    open_rollout(page, server, r["rollout_id"])
    tree = page.locator(f"details.judge[data-request='{r['request_id']}'] > ul.tree > li")
    tree.locator("xpath=..").locator("xpath=..").evaluate("d => d.open = true")
    assert tree.locator(":scope > .score").text_content() == f"{r['score']:.2f}"
    added = tree.locator("li.leaf").filter(has_text="criterion added later")
    assert added.locator(".score").text_content() == "n/g" and "not graded" in added.text_content()
    assert "ungraded" in added.locator(".score").get_attribute("class")
    assert tree.locator(".mismatch").count() == 0  # the graded leaves give the judge's score


def test_plots_draw_one_series_per_dataset_with_labelled_axes(data, server, page):
    _, _, cat = data
    page.goto(server + "/plots?plan=ui-plan")
    page.wait_for_selector("#figures[data-drawn='1']", state="attached")
    refs = {r["ref"] for r in rows(cat, "SELECT DISTINCT dataset AS ref FROM rl_iterations "
                                        "WHERE plan = 'ui-plan' AND dataset IS NOT NULL")}
    lengths = page.locator("#fig-windows .chart").first
    assert lengths.locator("path.series").count() == len(refs) > 1
    for chart in page.locator(".chart").all():
        if chart.locator("path.series, rect.bar").count():
            assert chart.locator(".xlabel").text_content() and chart.locator(".ylabel").text_content()
