"""`klong ui` is driven by its user alone: it refuses a foreign Host (DNS rebinding), runs SQL only by POST from
its own page (token, origin), stops every query at its time limit (while other pages keep answering), at its
row cap, and when its client leaves; ids that are hostile as URLs are encoded in links and open.

One data home of a few rollouts with hostile ids (real broker, sink and archive), served by the real app in
uvicorn on a free port."""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from consumers.sink import Sink
from ui.app import ServerThread, create_app, rollout_url
from ui.guard import allowed_hosts, host_name
from ui.query import Limits
from tests.helpers import produce, rollout_events

HOSTILE = ["../sql?q=SELECT 1", "a/b/../c", "..", "x#y%2Fz"]
HEAVY = "SELECT sum(a.range * b.range) FROM range(10000000) a, range(10000000) b"  # 1e14 rows: runs for hours
LIMIT_S = 4.0
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def home(broker, tmp_path_factory):
    import uuid

    from services.broker import ensure_topics
    from core.settings import Settings, Topics

    settings = Settings(home=tmp_path_factory.mktemp("uisec") / "home", bootstrap_servers=broker.bootstrap,
                        topics=Topics(f"t{uuid.uuid4().hex[:10]}"), partitions=2)
    settings.home.mkdir(parents=True)
    ensure_topics(settings)
    events = []
    for k, rid in enumerate(HOSTILE + ["plain"]):
        events += rollout_events(rid, 6, group_id="g/../x" if k < 2 else "g1", seed=k)
    produce(settings, events)
    Sink(settings).run(until_idle=True)
    return settings


@pytest.fixture(scope="module")
def app(home):
    return create_app(home, limits=Limits(timeout_s=LIMIT_S, max_rows=100_000, max_bytes=64 << 20))


@pytest.fixture(scope="module")
def server(app):
    with ServerThread(app) as url:
        yield url


def request(url: str, method: str = "GET", path: str = "/", body: dict | None = None, headers: dict | None = None,
            timeout: float = 60) -> tuple[int, str, float]:
    """(status, body, seconds) of one request with exactly these headers (Host included when given)."""
    u = urllib.parse.urlsplit(url)
    con = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    data = urllib.parse.urlencode(body).encode() if body is not None else None
    hdrs = {"Content-Type": "application/x-www-form-urlencoded"} if data else {}
    hdrs.update(headers or {})
    t0 = time.monotonic()
    try:
        con.putrequest(method, path, skip_host="Host" in hdrs)
        for k, v in hdrs.items():
            con.putheader(k, v)
        if data:
            con.putheader("Content-Length", str(len(data)))
        con.endheaders(data)
        r = con.getresponse()
        return r.status, r.read().decode(errors="replace"), time.monotonic() - t0
    finally:
        con.close()


def token_of(url: str) -> str:
    status, html, _ = request(url, path="/sql")
    assert status == 200
    return re.search(r'name="token" value="([^"]+)"', html).group(1)


def test_host_names():
    assert host_name("localhost:8765") == "localhost" and host_name("[::1]:80") == "::1"
    assert host_name("Evil.com") == "evil.com" and host_name("127.0.0.1") == "127.0.0.1"
    assert allowed_hosts("127.0.0.1") == {"127.0.0.1", "localhost", "::1"}
    assert allowed_hosts("0.0.0.0") == {"127.0.0.1", "localhost", "::1"}  # a wildcard bind adds no name
    assert "viewer.lan" in allowed_hosts("viewer.lan")


def test_a_foreign_host_is_refused(server):
    port = urllib.parse.urlsplit(server).port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
        status, body, _ = request(server, headers={"Host": host})
        assert status == 200, body[-3000:]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", ""):
        status, body, _ = request(server, headers={"Host": host})
        assert status == 421 and "is not this viewer" in body, host
    # DNS rebinding: a page on evil.example resolved to 127.0.0.1 cannot read the data either
    token = token_of(server)
    status, body, _ = request(server, "POST", "/sql.csv", {"q": "SELECT rollout_id FROM rollouts", "token": token},
                              headers={"Host": f"evil.example:{port}"})
    assert status == 421 and "plain" not in body
    assert request(server, path="/api/step?rollout=plain&idx=0", headers={"Host": "evil.example"})[0] == 421


def test_the_host_option_adds_its_name(home):
    with ServerThread(create_app(home, host="viewer.lan")) as url:
        assert request(url, headers={"Host": "viewer.lan:1234"})[0] == 200
        assert request(url, headers={"Host": "other.lan"})[0] == 421


def test_sql_runs_only_by_post_from_the_viewer_page(server):
    q = "SELECT rollout_id FROM rollouts ORDER BY 1"
    status, html, _ = request(server, path="/sql?" + urllib.parse.urlencode({"q": q}))
    assert status == 200 and 'id="result"' not in html and "plain" not in html  # a GET shows the query, runs nothing
    assert request(server, path="/sql.csv?" + urllib.parse.urlencode({"q": q}))[0] == 405  # no GET download
    token = token_of(server)
    status, body, _ = request(server, "POST", "/sql", {"q": q})
    assert status == 403 and "token" in body
    status, body, _ = request(server, "POST", "/sql", {"q": q, "token": "x" + token})
    assert status == 403
    status, body, _ = request(server, "POST", "/sql.csv", {"q": q, "token": token},
                              headers={"Origin": "http://evil.example"})
    assert status == 403 and "cross-origin" in body and "plain" not in body
    status, body, _ = request(server, "POST", "/sql", {"q": q, "token": token}, headers={"Sec-Fetch-Site": "cross-site"})
    assert status == 403
    port = urllib.parse.urlsplit(server).port
    status, body, _ = request(server, "POST", "/sql.csv", {"q": q, "token": token},
                              headers={"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"})
    assert status == 200 and body.splitlines() == ["rollout_id", *sorted(HOSTILE + ["plain"])]


def test_a_query_stops_at_its_time_limit_while_pages_keep_answering(server, app):
    token = token_of(server)
    out = {}

    def heavy():
        out["status"], out["body"], out["wall"] = request(server, "POST", "/sql", {"q": HEAVY, "token": token},
                                                          timeout=LIMIT_S * 10)

    t = threading.Thread(target=heavy)
    t.start()
    answered = 0
    while t.is_alive():  # the list page answers while the query runs (each well within the query's limit)
        status, html, took = request(server, path="/", timeout=LIMIT_S * 10)
        assert status == 200 and "plain" in html
        answered += t.is_alive() and bool(app.state.running)
        time.sleep(0.2)
    t.join()
    assert answered >= 1, "no page was answered while the query ran"
    assert out["status"] == 400 and f"stopped at the query time limit of {LIMIT_S:g} s" in out["body"]
    stopped = float(re.search(r'id="elapsed" data-s="([0-9.]+)"', out["body"]).group(1))
    # the server stopped it at its limit: the query alone runs for hours; DuckDB's interrupt lands within
    # milliseconds, and the 8 s margin is for the query thread's exit on a loaded 2-core machine
    assert LIMIT_S <= stopped < LIMIT_S + 8.0
    assert out["wall"] < LIMIT_S * 10
    deadline = time.monotonic() + 30
    while app.state.running and time.monotonic() < deadline:  # its thread ends once DuckDB returns
        time.sleep(0.05)
    assert not app.state.running


def test_a_query_stops_when_its_client_leaves(server, app):
    inner = create_app(app.state.settings, limits=Limits(timeout_s=600))
    with ServerThread(inner) as url:
        token = token_of(url)
        body = urllib.parse.urlencode({"q": HEAVY, "token": token}).encode()
        u = urllib.parse.urlsplit(url)
        sock = socket.create_connection((u.hostname, u.port), timeout=30)
        sock.sendall(b"POST /sql.csv HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 60
        while not inner.state.running:  # the query started
            assert time.monotonic() < deadline, "the query never started"
            time.sleep(0.05)
        query = next(iter(inner.state.running))
        sock.close()  # the client leaves long before the 600 s limit
        deadline = time.monotonic() + 60
        while inner.state.running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not inner.state.running and query.stopped == "cancelled"


def test_a_stop_that_falls_between_two_duckdb_calls_still_stops_the_query(home, monkeypatch):
    """DuckDB forgets an interrupt that comes while its connection runs nothing (the next call runs
    uninterrupted): a client that leaves just before the query proper starts must still stop it. The real
    read-only check runs, then the client leaves, at exactly that moment, on every machine."""
    import ui.query as uq
    from store.catalog import Catalog

    check = uq.check_read_only
    box = {}

    def check_then_leave(con, statements):
        check(con, statements)
        box["query"].cancel()

    monkeypatch.setattr(uq, "check_read_only", check_then_leave)
    box["query"] = q = uq.BoundedQuery(Catalog(home), HEAVY, Limits(timeout_s=600))  # alone: runs for hours
    q.start().join(120)  # a margin for a loaded machine; stopped, it ends within milliseconds
    assert q.ended_at is not None and q.stopped == "cancelled"
    with pytest.raises(uq.QueryStopped, match="cancelled: its client left"):
        list(q.batches())


def test_rows_are_capped_and_streamed(server):
    token = token_of(server)
    status, html, _ = request(server, "POST", "/sql", {"q": "SELECT range AS n FROM range(40000000)", "token": token})
    assert status == 200 and "first 1000 rows shown" in html and html.count("<tr>") == 1001  # header + 1,000
    u = urllib.parse.urlsplit(server)
    con = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    con.request("POST", "/sql.csv", urllib.parse.urlencode({"q": "SELECT range AS n FROM range(40000000)",
                                                            "token": token}),
                {"Content-Type": "application/x-www-form-urlencoded"})
    r = con.getresponse()
    assert r.status == 200
    with pytest.raises(http.client.IncompleteRead):  # past the 100,000-row cap the download fails, never short
        r.read()
    con.close()


def test_sql_reads_neither_the_working_directory_temp_nor_the_home(server, home, tmp_path, monkeypatch):
    (home.home / "secret.csv").write_text("a\n1\n")
    token = token_of(server)
    for path in (home.home / "secret.csv", Path.cwd() / ".tmp" / "x.csv", "/etc/passwd"):
        status, html, _ = request(server, "POST", "/sql", {"q": f"SELECT * FROM read_csv('{path}')", "token": token})
        assert status == 400 and 'id="result"' not in html, path
    status, html, _ = request(server, "POST", "/sql", {"q": "SELECT current_setting('memory_limit') AS m, "
                                                             "'[' || current_setting('temp_directory') || ']' AS t",
                                                        "token": token})
    # no spill directory at all: DuckDB would let SQL read it whatever the lock-down says
    assert status == 200 and "[]" in html and "GiB" in html


def test_a_query_past_the_memory_limit_fails_with_what_to_do(home):
    """The viewer never spills (nothing on disk for SQL to read): a query past memory_limit fails, saying why."""
    from store.catalog import Catalog
    from ui.query import BoundedQuery

    catalog = Catalog(home, config={"memory_limit": "64MB", "temp_directory": ""})
    q = BoundedQuery(catalog, "SELECT count(*) FROM (SELECT * FROM range(20000000) ORDER BY random())",
                     Limits(timeout_s=300)).start()
    with pytest.raises(Exception, match="without spilling: narrow the query or raise --memory-limit"):
        list(q.batches())


def test_hostile_ids_are_encoded_in_links_and_open(server):
    status, html, _ = request(server)
    assert status == 200
    for rid in HOSTILE:
        link = rollout_url(rid)
        if rid == "..":  # a browser would resolve the path segment away: the id goes in the query
            assert link == "/rollout?id=.."
        else:
            assert link == "/rollouts/" + urllib.parse.quote(rid, safe="") and link.count("/") == 2 and "?" not in link
        assert f'href="{link}"' in html, rid
        status, page, _ = request(server, path=link)
        assert status == 200 and f'<code id="rid">{rid}</code>' in page, rid
        assert f'href="/tokens?rollout={urllib.parse.quote(rid, safe="")}&amp;step=2"' in page
        status, frag, _ = request(server, path=f"/api/step?rollout={urllib.parse.quote(rid, safe='')}&idx=1")
        assert status == 200 and "user step 1" in frag


def test_hostile_ids_open_in_a_browser(server):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    from tests.test_ui import BROWSER_TIMEOUT_MS, CHROMIUM_ARGS

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = b.new_page()
        page.set_default_timeout(BROWSER_TIMEOUT_MS)
        for rid in HOSTILE:
            page.goto(server + "/")
            page.locator("#rollouts td.id:first-child a").filter(has_text=re.compile(f"^{re.escape(rid)}$")).click()
            page.wait_for_selector("#conversation[data-complete='1']", state="attached")
            assert page.locator("#rid").text_content() == rid
            assert "/sql" not in page.url
            page.locator("#grouplink").click()
            page.wait_for_selector("#gid")
            assert page.locator("#gid").text_content() in ("g/../x", "g1")
        b.close()


def test_plots_say_one_iteration_so_far_instead_of_a_dot(server):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    from tests.test_ui import BROWSER_TIMEOUT_MS, CHROMIUM_ARGS

    status, body, took = request(server, path="/api/plots")
    rl = next(f for f in __import__("json").loads(body)["figures"] if f["name"] == "rl_curves")
    assert status == 200 and all(len(s["x"]) == 1 for p in rl["panels"] for s in p["series"])  # one iteration here
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = b.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(BROWSER_TIMEOUT_MS)
        page.goto(server + "/plots")
        page.wait_for_selector("#figures[data-drawn='1']", state="attached")
        charts = page.locator("#fig-rl_curves .chart")
        assert charts.count() == len(rl["panels"]) >= 2
        for c in charts.all():
            assert "one iteration so far" in c.text_content() and c.locator("path.series, circle").count() == 0
        assert page.locator("#fig-windows").text_content().count("no data") == 1  # no dataset in this home
        b.close()
