"""The `klong ui` web app: read-only pages over the catalog (FastAPI, Jinja2 templates, static JS/CSS).

    klong ui [--port 8765] [--host 127.0.0.1]   # http://127.0.0.1:8765/
    app = create_app(settings); serve(app, port=8765)      # the same from Python (blocks)
    with ServerThread(create_app(settings)) as url: ...    # in a thread on a free port (tests, bench)

Pages (GETs that change nothing): `/` rollouts (filter by task, group, stage, iteration, status, score;
sort by any column; PAGE_ROWS a page), `/rollouts/<rollout_id>` one rollout as a conversation (judge
results as rubric trees, blacklist hits, a dataset version's windows overlaid; j/k step, n/p rollout),
`/search` full-text search over steps (all rollouts or one; through a word index kept under
`<home>/index/steps/`), `/groups/<group_id>` a group's rollouts side
by side, `/tokens` one step's tokens (log-probs, a window's loss mask), `/plots` the report's figures drawn
in the browser from `/api/plots` (PNGs at `/plots/<name>.png`), `/blacklist` every hit, `/sql` the SQL
box (ui.sql: runs by POST only). Ids go into links URL-encoded (`rollout_url`); an id that is `.`
or `..` as a path segment would be resolved away by the browser, so `/rollout?id=` opens any id.
JSON and fragments for the pages' scripts: `/api/steps?rollout=ID&start=N` (later steps as HTML),
`/api/step?rollout=ID&idx=N` (a step's whole content), `/api/overlay?rollout=ID&ref=NAME@N`.

Protection (ui.guard, ui.query): the Host header must name this viewer; the SQL box and search
run under a time limit, row and byte caps and DuckDB's memory limit, and stop when their client leaves.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Optional
from urllib.parse import quote

import duckdb
from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from core.settings import Settings
from schemas.errors import ConfigError, TerminalError
from store.archive import list_flushes
from store.catalog import Catalog
from store.datasets import all_manifests
from ui.overlay import overlay
from ui.report import FIGURES, figure_data, render
from store.search_index import StepIndex
from ui import finder, sql
from ui.guard import Forbidden, HostGuard, allowed_hosts, new_token
from ui.query import Limits
from ui.tokens import step_tokens
from ui.viewer import PAGE_ROWS, ROLLOUT_COLUMNS, STATUSES, NotFound, RolloutFilter, Viewer, as_jsonable

HERE = Path(__file__).parent
FIRST_STEPS = 200  # steps rendered with a rollout page; the rest come from /api/steps?rollout=ID&start=N
MEMORY_LIMIT = "2GB"  # DuckDB's memory limit for each of the viewer's connections (a query past it fails)
# The rollouts list's columns: compact, so a page fits a 1,400 px window (every ROLLOUT_COLUMNS sorts by URL)
LIST_COLUMNS = ("rollout_id", "task_id", "group_id", "stage", "iteration", "status", "final_score", "n_turns",
                "n_steps", "n_tokens", "elapsed_s", "n_judged", "policy_version", "started_at")


def _opt(value: Optional[str], cast=str):
    """A query parameter from a GET form: empty means not given."""
    if value is None or value.strip() == "":
        return None
    try:
        return cast(value.strip())
    except ValueError:
        raise ConfigError(f"bad filter value {value!r}: expected a {cast.__name__}") from None


def rollout_url(rollout_id: str) -> str:
    """The link to a rollout's page: the id URL-encoded as one path segment (`/` included)."""
    if rollout_id in ("", ".", ".."):  # a browser resolves these path segments away
        return "/rollout?id=" + quote(rollout_id, safe="")
    return "/rollouts/" + quote(rollout_id, safe="")


def group_url(group_id: str) -> str:
    if group_id in ("", ".", ".."):
        return "/group?id=" + quote(group_id, safe="")
    return "/groups/" + quote(group_id, safe="")


def create_app(settings: Settings, first_steps: int = FIRST_STEPS, host: str = "127.0.0.1",
               limits: Limits = Limits(), memory_limit: str = MEMORY_LIMIT, tokenizer: Optional[str] = None,
               search_index: bool = True) -> FastAPI:
    """The app over `settings.home`. A rollout page renders its first `first_steps` steps, its script loads the
    rest right after. `host`: the name it is served on (the Host header it accepts besides the local names);
    `limits`: what one query of the SQL box or search may take; `tokenizer`: token texts in the token view
    when no dataset names one; `search_index`: search through the word index (store.search_index, built in the
    background under `<home>/index/steps/`), else by scanning every step."""
    if first_steps < 1:
        raise ConfigError(f"first_steps {first_steps} must be >= 1")
    limits.check()
    # No spilling: DuckDB lets SQL read its temp directory whatever the lock-down says, so the viewer, which runs
    # SQL from web requests, has none (temp_directory ''); a query past memory_limit fails with a clear error
    catalog = Catalog(settings, config={"memory_limit": memory_limit, "temp_directory": ""})
    viewer = Viewer(catalog)
    index = StepIndex(settings) if search_index else None
    token = new_token()
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.trim_blocks = templates.env.lstrip_blocks = True  # no blank lines per step: a 700-turn page is smaller
    templates.env.filters.update(rollout_url=rollout_url, group_url=group_url, quote=lambda v: quote(str(v), safe=""))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # the figures' numbers for every rollout, computed once in the background: /plots answers from the cache
        threading.Thread(target=plot_numbers, args=("",), name="klong-ui-plots", daemon=True).start()
        if index is not None:  # and the search's word index brought up to date with the archive
            index.update_async()
        yield

    app = FastAPI(title="klong ui", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(HostGuard, hosts=allowed_hosts(host))
    app.state.settings = settings
    app.state.search_index = index
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    def page(request: Request, name: str, status_code: int = 200, **context) -> HTMLResponse:
        return templates.TemplateResponse(request, name, {"home": str(settings.home), **context},
                                          status_code=status_code)

    lock = threading.Lock()  # requests run in a thread pool: the two caches below change under it
    later: dict[tuple, list] = {}  # (rollout_id, flush directories) -> the steps a rollout page just read
    figures: dict[tuple, object] = {}  # (name, plan, archive state) -> PNG or data: computed once per state

    def flushes() -> tuple:
        """The archive's flush directories: immutable, so the same list means the same events (new data adds a
        directory, a quarantined one leaves)."""
        return tuple(str(d.path) for d in list_flushes(settings.archive))

    def archive_state() -> tuple:
        """What the figures depend on: the archive's flushes and the dataset versions (immutable too)."""
        return flushes(), tuple(sorted(m["ref"] for m in all_manifests(settings.home)))

    def cached(key: tuple, make):
        value = figures.get(key)
        if value is None:
            value = make()
            with lock:
                if len(figures) >= 64:
                    figures.clear()
                figures[key] = value
        return value

    def plot_numbers(plan: str) -> dict:
        """Every figure's panels for `plan` ("" = every rollout), computed once per archive state."""
        return cached(("data", plan, archive_state()), lambda: as_jsonable(figure_data(catalog, plan or None)))

    def error(request: Request, status: int, message: str):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message}, status_code=status)
        return page(request, "error.html", status, error=message)

    @app.exception_handler(NotFound)
    def not_found(request: Request, e: NotFound):
        return error(request, 404, str(e))

    @app.exception_handler(Forbidden)
    def forbidden(request: Request, e: Forbidden):
        return PlainTextResponse(str(e) + "\n", status_code=403)

    @app.exception_handler(TerminalError)
    def bad_request(request: Request, e: TerminalError):
        return error(request, 400, str(e))

    @app.exception_handler(duckdb.Error)
    def query_failed(request: Request, e: duckdb.Error):  # a view that cannot be read: say which, not a traceback
        return error(request, 500, f"the archive could not be read: {str(e).splitlines()[0] if str(e) else type(e).__name__}")

    @app.get("/", response_class=HTMLResponse)
    def rollouts(request: Request, task: str = "", group: str = "", stage: str = "", iteration: str = "",
                 status: str = "", min_score: str = "", max_score: str = "", sort: str = "started_at", desc: int = 1,
                 page_no: int = Query(0, alias="page"), n: int = PAGE_ROWS):
        f = RolloutFilter(limit=n, task=_opt(task), group=_opt(group), stage=_opt(stage, int), iteration=_opt(iteration, int),
                          status=_opt(status), min_score=_opt(min_score, float), max_score=_opt(max_score, float),
                          sort=sort, desc=bool(desc), page=page_no)
        t0 = time.perf_counter()
        result = viewer.rollouts(f)
        params = {k: v for k, v in request.query_params.items() if k != "page"}
        return page(request, "rollouts.html", f=f, columns=LIST_COLUMNS, statuses=STATUSES,
                    query_s=time.perf_counter() - t0, params=params, **result)

    def rollout_page(request: Request, rollout_id: str):
        t0 = time.perf_counter()
        data = viewer.rollout(rollout_id)
        if len(data["steps"]) > first_steps:  # the script asks for the rest in a moment: keep them at hand
            with lock:
                while len(later) >= 8:
                    later.pop(next(iter(later)))
                later[(rollout_id, flushes())] = data["steps"]
        return page(request, "rollout.html", r=data, query_s=time.perf_counter() - t0, first_steps=first_steps)

    @app.get("/rollouts/{rollout_id:path}", response_class=HTMLResponse)
    def rollout(request: Request, rollout_id: str):
        return rollout_page(request, rollout_id)

    @app.get("/rollout", response_class=HTMLResponse)
    def rollout_by_query(request: Request, id: str):
        return rollout_page(request, id)

    @app.get("/api/steps", response_class=HTMLResponse)
    def later_steps(request: Request, rollout: str, start: int = 0):
        steps = later.get((rollout, flushes())) or viewer.conversation(rollout)
        return templates.TemplateResponse(request, "_steps.html", {"steps": steps[start:], "rid": rollout})

    @app.get("/api/step")
    def step(rollout: str, idx: int):
        return as_jsonable(viewer.step(rollout, idx))

    @app.get("/api/overlay")
    def rollout_overlay(rollout: str, ref: str):
        ov = overlay(settings.home, ref, rollout)
        ov["steps"] = {str(k): v for k, v in ov["steps"].items()}
        return as_jsonable(ov)

    @app.get("/search", response_class=HTMLResponse)
    def search(request: Request, q: str = "", rollout: str = "", role: str = "", page_no: int = Query(0, alias="page")):
        t0 = time.perf_counter()
        found = finder.search(catalog, limits, q, running=app.state.running, rollout=_opt(rollout), role=_opt(role),
                              page=page_no, index=index)
        return page(request, "search.html", q=q, rollout=rollout, role=role, roles=finder.ROLES,
                    query_s=time.perf_counter() - t0, **found)

    @app.get("/groups/{group_id:path}", response_class=HTMLResponse)
    def group(request: Request, group_id: str):
        return page(request, "group.html", g=finder.group(catalog, group_id))

    @app.get("/group", response_class=HTMLResponse)
    def group_by_query(request: Request, id: str):
        return page(request, "group.html", g=finder.group(catalog, id))

    @app.get("/tokens", response_class=HTMLResponse)
    def tokens(request: Request, rollout: str, step: int, ref: str = "", window: str = ""):
        win = _opt(window, int)
        tv = step_tokens(catalog, rollout, step, home=settings.home, ref=_opt(ref), window=win, tokenizer=tokenizer)
        versions = viewer.windows_of(rollout, step)
        return page(request, "tokens.html", tv=tv, versions=versions)

    @app.get("/plots", response_class=HTMLResponse)
    def plots(request: Request, plan: str = ""):
        plans = cached(("plans", archive_state()), lambda: [
            r["plan"] for r in catalog.arrow("SELECT DISTINCT plan FROM rl_iterations ORDER BY 1").to_pylist()])
        return page(request, "plots.html", figures=list(FIGURES), plan=plan, plans=plans)

    @app.get("/api/plots")
    def plot_data(plan: str = ""):
        return plot_numbers(plan)

    @app.get("/plots/{name}.png")
    def plot(name: str, plan: str = ""):
        if name not in FIGURES:
            raise NotFound(f"no figure {name!r} (figures: {', '.join(FIGURES)})")
        png = cached((name, plan, archive_state()), lambda: render(name, catalog, plan or None))
        return Response(png, media_type="image/png")

    @app.get("/blacklist", response_class=HTMLResponse)
    def blacklist(request: Request):
        return page(request, "blacklist.html", hits=viewer.blacklist_hits())

    sql.register(app, catalog, limits, token, page)
    return app


def serve(app: FastAPI, port: int = 8765, host: str = "127.0.0.1") -> None:
    """Serves until interrupted (uvicorn, one process); ConfigError when the port is taken."""
    import socket

    import uvicorn

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot serve on {host}:{port}: {e.strerror} (pick another --port)") from None
    uvicorn.run(app, host=host, port=port, log_level="warning")


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 in a daemon thread; the context value is the base URL.
    (The app answers to the Host names 127.0.0.1 and localhost: use this URL, or http://localhost:PORT.)"""

    def __init__(self, app: FastAPI, port: int = 0):
        import uvicorn

        from services.broker import free_port

        port = port or free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:  # uvicorn sets it once the socket listens
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise TerminalError(f"klong ui: the server on {self.url} did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
