"""Benchmark: `klong ui` on a 700-turn rollout (the conversation page and a dataset overlay, server time and
browser load, goal < 1 s each), and on a 1,000-rollout archive (full-text search and /plots, goal < 1 s
each), beside a plain query of the same rows measured in the same run.

    .venv/bin/python bench/ui.py [--part all|page|find] [--turns 700] [--rollouts 4] [--find-rollouts 1000]
                                 [--repeat 5] [--keep DIR]

Find part: `--find-rollouts` simulated rollouts of 10-40 turns (real broker, recorder, sink) and an RL dataset
version; the search's word index built cold (store.search_index); then, served by the app in this process: GET
/search over every rollout and within one rollout (a word that occurs in some steps, and text that occurs in
none), beside the same search scanning every step (`finder.search(index=None)`, what the viewer did before the
index) and the same match as a plain in-process `Catalog.arrow` count (one scan of `steps`); /plots in the browser
until every figure is drawn and its server parts (the page, /api/plots from the cache the app fills in the
background at start), beside computing the numbers cold and `klong report`'s matplotlib PNGs.

Data: `klong simulate` rollouts of exactly `--turns` turns through the real broker (embedded Tansu) and
recorder, archived by the sink, and an RL dataset version built from them (max_tokens 32768, so a rollout
has dozens of windows). Then, with `klong ui`'s app served by uvicorn in this process:
- server: wall time of GET /rollouts/<id> (the HTML, all queries included) and of the overlay JSON;
- browser: headless Chromium (Playwright): the page's load event (its first FIRST_STEPS steps shown), all
  steps in the page (the script appends the rest), a scroll to the bottom (until the next two frames), and
  switching the overlay on (select -> windows drawn);
- peer: `klong sql` of the same steps (the columns the page shows, whole contents) as a process, as a user
  would run it, and the same query in-process (Catalog.arrow), and of the rollout's samples.
Medians of `--repeat` runs; one figure per line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.broker import BrokerProcess, ensure_topics, free_port  # noqa: E402
from core.settings import Settings, Topics  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]
GOAL_S = 1.0


def make_home(root: Path, rollouts: int, turns: int) -> tuple[Settings, str, str]:
    """Simulated rollouts -> broker -> sink -> archive, and an RL dataset version; (settings, rollout, ref)."""
    from consumers.materialize import build_version
    from consumers.sink import Sink
    from producers.outbox import Outbox
    from producers.simulate import simulate
    from store.catalog import Catalog

    broker = BrokerProcess.start(free_port(), root / "broker.log")
    try:
        settings = Settings(home=root / "home", bootstrap_servers=broker.bootstrap, topics=Topics("bench"), partitions=4)
        settings.home.mkdir(parents=True)
        ensure_topics(settings)
        with Outbox(settings, fsync="batch", retain="acked") as outbox:
            simulate(outbox, rollouts=rollouts, seed=0, turns=(turns, turns), running_fraction=0.0, timeout_fraction=0.0)
            outbox.flush(timeout=600)
        Sink(settings).run(until_idle=True)
    finally:
        broker.stop()
    ref = build_version(settings.home, "bench-ui", "rl", {"max_tokens": 32768, "overlap_turns": 2}).ref
    rid = Catalog(settings).arrow("SELECT rollout_id FROM rollouts ORDER BY n_turns DESC, rollout_id LIMIT 1"
                                  ).column(0)[0].as_py()
    return settings, rid, ref


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=120) as r:
        return r.read()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=700, help="assistant turns per rollout (default 700)")
    ap.add_argument("--rollouts", type=int, default=4, help="rollouts in the archive (default 4)")
    ap.add_argument("--repeat", type=int, default=5, help="runs per measurement; the median is printed")
    ap.add_argument("--keep", help="build the data home here and keep it (default: a temp dir, removed)")
    ap.add_argument("--part", choices=("all", "page", "find"), default="all", help="what to measure (default all)")
    ap.add_argument("--find-rollouts", type=int, default=1000, help="rollouts of the search/plots archive (default 1000)")
    args = ap.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="klong-bench-ui-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (other work slows every figure alike)")
        rc = run(root / "page", args) if args.part in ("all", "page") else 0
        return rc or (run_find(root / "find", args) if args.part in ("all", "find") else 0)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def run(root: Path, args) -> int:
    from playwright.sync_api import sync_playwright

    from store.catalog import Catalog, sql_str
    from ui.app import FIRST_STEPS, ServerThread, create_app

    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    settings, rid, ref = make_home(root, args.rollouts, args.turns)
    cat = Catalog(settings)
    info = cat.arrow(f"SELECT n_steps, n_turns, n_tokens FROM rollouts WHERE rollout_id = {sql_str(rid)}").to_pylist()[0]
    n_windows = cat.scalar(f"SELECT count(*) FROM samples WHERE rollout_id = {sql_str(rid)}")
    print(f"data: {args.rollouts} rollouts of {args.turns} turns simulated, archived and built into {ref} in "
          f"{time.perf_counter() - t0:.0f} s; rollout {rid}: {info['n_steps']:,} steps, {info['n_turns']} turns, "
          f"{info['n_tokens']:,} tokens, {n_windows} windows")

    steps_sql = ("SELECT step_idx, role, content, tool_name, tool_arguments, n_tokens, pinned, elapsed_s, policy_version "
                 f"FROM steps WHERE rollout_id = {sql_str(rid)} ORDER BY step_idx")
    samples_sql = f"SELECT * FROM samples WHERE rollout_id = {sql_str(rid)} AND dataset = 'bench-ui'"
    klong = [sys.executable, "-m", "klong", "sql", "--home", str(settings.home), "--format", "csv", "-o",
             str(root / "out.csv")]
    sql_proc = timed(lambda: subprocess.run([*klong, steps_sql], check=True, cwd=ROOT), args.repeat)
    sql_inproc = timed(lambda: cat.arrow(steps_sql), args.repeat)
    samples_proc = timed(lambda: subprocess.run([*klong, samples_sql], check=True, cwd=ROOT), args.repeat)
    samples_inproc = timed(lambda: cat.arrow(samples_sql), args.repeat)

    with ServerThread(create_app(settings)) as url:
        page_url = f"{url}/rollouts/{rid}"
        overlay_url = f"{url}/api/overlay?rollout={rid}&ref={ref}"
        get(page_url)  # first request: imports and template compilation
        html_bytes = len(get(page_url))
        server_page = timed(lambda: get(page_url), args.repeat)
        server_overlay = timed(lambda: get(overlay_url), args.repeat)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(120_000)
            loads, wholes, scrolls, overlays = [], [], [], []
            for _ in range(args.repeat):
                page.goto(page_url, wait_until="load")
                loads.append(page.evaluate("(() => { const n = performance.getEntriesByType('navigation')[0]; "
                                           "return (n.loadEventEnd - n.startTime) / 1000; })()"))
                page.wait_for_selector("#conversation[data-complete='1']", state="attached")  # the later steps
                wholes.append(page.evaluate("performance.now() / 1000"))
                scrolls.append(page.evaluate("""() => new Promise((done) => { const t = performance.now();
                    window.scrollTo(0, document.body.scrollHeight);
                    requestAnimationFrame(() => requestAnimationFrame(() => done((performance.now() - t) / 1000))); })"""))
                t0 = time.perf_counter()
                page.select_option("#overlay-select", ref)
                page.wait_for_function(f"document.getElementById('overlay-info').dataset.ref === '{ref}'")
                overlays.append(time.perf_counter() - t0)
            n_rows = page.locator("#windows tr.window").count()
            n_steps = page.locator("#conversation .step").count()
            browser.close()
    assert n_steps == info["n_steps"] and n_rows == n_windows, (n_steps, n_rows)

    def verdict(x: float) -> str:
        return "ok" if x < GOAL_S else "OVER the goal"

    load, whole = statistics.median(loads), statistics.median(wholes)
    scroll, ov = statistics.median(scrolls), statistics.median(overlays)
    print(f"rollout page, server (GET, all queries + HTML, {html_bytes / 1e6:.2f} MB): {server_page:.3f} s "
          f"(goal < {GOAL_S:.0f} s: {verdict(server_page)})")
    print(f"rollout page, browser: first {FIRST_STEPS} steps shown (navigation -> load event): {load:.3f} s "
          f"(goal < {GOAL_S:.0f} s: {verdict(load)})")
    print(f"rollout page, browser: all {n_steps:,} steps in the page (navigation -> later steps appended): "
          f"{whole:.3f} s (goal < {GOAL_S:.0f} s: {verdict(whole)})")
    print(f"rollout page, scroll to the bottom (two frames): {scroll:.3f} s")
    print(f"peer: klong sql of the same {info['n_steps']:,} steps (a process, CSV): {sql_proc:.3f} s; "
          f"in-process Catalog.arrow: {sql_inproc:.3f} s")
    print(f"ratio page server / klong sql process: {server_page / sql_proc:.2f}; "
          f"page server / in-process query: {server_page / sql_inproc:.2f}")
    print(f"overlay {ref}, server (GET JSON, {n_windows} windows): {server_overlay:.3f} s "
          f"(goal < {GOAL_S:.0f} s: {verdict(server_overlay)})")
    print(f"overlay {ref}, browser (select -> windows drawn): {ov:.3f} s (goal < {GOAL_S:.0f} s: {verdict(ov)})")
    print(f"peer: klong sql of the rollout's samples (a process): {samples_proc:.3f} s; in-process: {samples_inproc:.3f} s; "
          f"ratio overlay server / klong sql process: {server_overlay / samples_proc:.2f}")
    return 0


def make_find_home(root: Path, rollouts: int) -> tuple[Settings, str]:
    """`rollouts` simulated rollouts of 10-40 turns through the real broker, archived, and an RL dataset."""
    from consumers.materialize import build_version
    from consumers.sink import Sink
    from producers.outbox import Outbox
    from producers.simulate import simulate

    broker = BrokerProcess.start(free_port(), root / "broker.log")
    try:
        settings = Settings(home=root / "home", bootstrap_servers=broker.bootstrap, topics=Topics("benchfind"),
                            partitions=4)
        settings.home.mkdir(parents=True)
        ensure_topics(settings)
        with Outbox(settings, fsync="batch", retain="acked") as outbox:
            simulate(outbox, rollouts=rollouts, seed=1, turns=(10, 40), running_fraction=0.0)
            outbox.flush(timeout=900)
        Sink(settings).run(until_idle=True)
    finally:
        broker.stop()
    return settings, build_version(settings.home, "bench-find", "rl", {"max_tokens": 32768, "overlap_turns": 2}).ref


def run_find(root: Path, args) -> int:
    from urllib.parse import quote

    from playwright.sync_api import sync_playwright

    from store.catalog import Catalog, sql_str
    from ui.app import ServerThread, create_app

    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if (root / "home" / "datasets" / "bench-find").is_dir():  # --keep DIR of an earlier run: measure it again
        settings, ref = Settings(home=root / "home"), "bench-find@1"
    else:
        settings, ref = make_find_home(root, args.find_rollouts)
    from store.search_index import StepIndex
    from ui import finder
    from ui.query import Limits

    shutil.rmtree(settings.home / "index", ignore_errors=True)  # measure the index build cold
    t1 = time.perf_counter()
    n_indexed = StepIndex(settings).update()
    built = time.perf_counter() - t1
    size = sum(f.stat().st_size for f in (settings.home / "index").rglob("*") if f.is_file())
    cat = Catalog(settings)
    n_rollouts, n_steps, n_chars = cat.arrow("SELECT count(DISTINCT rollout_id), count(*), sum(length(content))::DOUBLE "
                                             "FROM steps").to_pylist()[0].values()
    print(f"data: {n_rollouts:,} rollouts, {n_steps:,} steps, {n_chars / 1e6:.0f} M characters simulated, archived and "
          f"built into {ref} in {time.perf_counter() - t0:.0f} s")
    print(f"search index: {n_indexed} step files, {size / 1e6:.1f} MB of Parquet, built cold in {built:.1f} s (once, in "
          f"the viewer's background; a new flush is searched by reading it until the next update indexes it)")
    # a word some steps hold (from the simulated steps themselves), and one no step holds
    word = cat.scalar("SELECT split_part(trim(content), ' ', 1) FROM steps WHERE role = 'assistant' "
                      "AND length(split_part(trim(content), ' ', 1)) >= 5 ORDER BY rollout_id, step_idx LIMIT 1")
    rid = cat.scalar("SELECT rollout_id FROM rollouts ORDER BY n_steps DESC, rollout_id LIMIT 1")
    floor_sql = ("SELECT count(*) FROM steps WHERE contains(lower(content), {w}) OR contains(lower(tool_arguments), {w})")
    verdicts = []

    def verdict(x: float) -> str:
        verdicts.append(x < GOAL_S)
        return "ok" if x < GOAL_S else "OVER the goal"

    with ServerThread(create_app(settings)) as url:
        get(f"{url}/api/plots")  # the figures' numbers the app computes in the background at start: not during the timing
        get(f"{url}/search?q=warmup")
        for label, text, scope in (("a word in some steps", word, ""), ("text in no step", "zq-no-such-text-xj", ""),
                                   ("a word, one rollout", word, f"&rollout={quote(rid, safe='')}")):
            q = f"{url}/search?q={quote(text)}{scope}"
            server = timed(lambda: get(q), args.repeat)
            hits = get(q).decode().count('class="hit"')
            rollout = rid if scope else None
            scan = timed(lambda: finder.search(cat, Limits(), text, rollout=rollout, index=None), args.repeat)
            floor = timed(lambda: cat.arrow(floor_sql.format(w=sql_str(text.lower()))), args.repeat)
            print(f"search over {n_rollouts:,} rollouts, {label} ({hits} hits shown), GET /search through the index: "
                  f"{server:.3f} s (goal < {GOAL_S:.0f} s: {verdict(server)}); the same search by scanning every step "
                  f"(in-process): {scan:.3f} s; in-process count of the same match: {floor:.3f} s; ratio index / scan "
                  f"{server / scan:.2f}, index / count {server / floor:.2f}")
        from ui.report import figure_data

        cold = timed(lambda: figure_data(cat), 1)  # what the app computes in the background once per archive state
        cached = timed(lambda: get(f"{url}/api/plots"), args.repeat)
        page_html = timed(lambda: get(f"{url}/plots"), args.repeat)
        from ui.report import FIGURES, render

        t1 = time.perf_counter()
        for name in FIGURES:
            render(name, cat)
        png = time.perf_counter() - t1
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(120_000)
            drawn = []
            for _ in range(args.repeat):
                t1 = time.perf_counter()
                page.goto(f"{url}/plots")
                page.wait_for_selector("#figures[data-drawn='1']", state="attached")
                drawn.append(time.perf_counter() - t1)
            n_charts = page.locator(".chart").count()
            browser.close()
    d = statistics.median(drawn)
    print(f"/plots, browser (navigation -> {n_charts} charts drawn, numbers cached): {d:.3f} s "
          f"(goal < {GOAL_S:.0f} s: {verdict(d)})")
    print(f"/plots, server: page {page_html:.3f} s (goal < {GOAL_S:.0f} s: {verdict(page_html)}); figures' numbers "
          f"{cached:.3f} s from the cache; computing them cold (SQL, done in the background at start and once per "
          f"archive state): {cold:.3f} s")
    print(f"peer: the same figures as PNG by matplotlib (klong report's path, SQL included): {png:.3f} s; "
          f"ratio cold numbers / PNG: {cold / png:.2f}; browser /plots / PNG: {d / png:.3f}")
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
