"""The `klong ui` web app: read-only pages over the catalog (FastAPI, Jinja2 templates, static JS/CSS).

    klong ui [--port 8765]                      # http://127.0.0.1:8765/
    app = create_app(settings); serve(app, port=8765)      # the same from Python (blocks)
    with ServerThread(create_app(settings)) as url: ...    # in a thread on a free port (tests, bench)

Pages: `/` rollouts (filter by task, stage, iteration, status, score; sort by any column),
`/rollouts/<rollout_id>` one rollout as a conversation (judge results as rubric trees, blacklist hits, a
dataset version's windows overlaid; its first FIRST_STEPS steps come with the page, its script fetches the
rest from `/rollouts/<rollout_id>/steps?start=N` as HTML), `/sql` a SQL box over the same read-only views (`/sql.csv`
downloads the result), `/plots` the report's figures (`/plots/<name>.png`), `/blacklist` every hit.
JSON for the page's script: `/api/rollouts/<id>/steps/<idx>` (a step's whole content) and
`/api/rollouts/<id>/overlay?ref=NAME@N`. Every query goes through store.catalog.Catalog; user SQL through
its read-only path (anything but SELECT is refused).
"""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path
from typing import Optional

import duckdb
import polars as pl
import pyarrow as pa
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from klong.settings import Settings
from schemas.errors import ConfigError, TerminalError
from store.archive import list_flushes
from store.catalog import Catalog
from store.datasets import all_manifests
from store.overlay import overlay
from store.report import FIGURES, render
from store.viewer import ROLLOUT_COLUMNS, STATUSES, NotFound, RolloutFilter, Viewer, as_jsonable

HERE = Path(__file__).parent
SQL_ROWS_SHOWN = 1000  # the page shows this many rows; the CSV download has them all
FIRST_STEPS = 200  # steps rendered with a rollout page; the rest come from /rollouts/<id>/steps?start=N


def _opt(value: Optional[str], cast=str):
    """A query parameter from a GET form: empty means not given."""
    if value is None or value.strip() == "":
        return None
    try:
        return cast(value.strip())
    except ValueError:
        raise ConfigError(f"bad filter value {value!r}: expected a {cast.__name__}") from None


def create_app(settings: Settings, first_steps: int = FIRST_STEPS) -> FastAPI:
    """The app over `settings.home`; a rollout page renders its first `first_steps` steps, its script loads the rest
    right after (so a 700-turn rollout shows at once and is whole a moment later)."""
    if first_steps < 1:
        raise ConfigError(f"first_steps {first_steps} must be >= 1")
    catalog = Catalog(settings)
    viewer = Viewer(catalog)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.trim_blocks = templates.env.lstrip_blocks = True  # no blank lines per step: a 700-turn page is smaller
    app = FastAPI(title="klong ui", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    def page(request: Request, name: str, status_code: int = 200, **context) -> HTMLResponse:
        return templates.TemplateResponse(request, name, {"home": str(settings.home), **context},
                                          status_code=status_code)

    lock = threading.Lock()  # requests run in a thread pool: the two caches below change under it
    later: dict[tuple, list] = {}  # (rollout_id, flush directories) -> the steps a rollout page just read
    figures: dict[tuple, bytes] = {}  # (name, plan, archive state) -> PNG: a figure is drawn once per state

    def flushes() -> tuple:
        """The archive's flush directories: immutable, so the same list means the same events (new data adds a
        directory, a quarantined one leaves)."""
        return tuple(str(d.path) for d in list_flushes(settings.archive))

    def archive_state() -> tuple:
        """What the figures depend on: the archive's flushes and the dataset versions (immutable too)."""
        return flushes(), tuple(sorted(m["ref"] for m in all_manifests(settings.home)))

    @app.exception_handler(NotFound)
    def not_found(request: Request, e: NotFound):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": str(e)}, status_code=404)
        return page(request, "error.html", 404, error=str(e))

    @app.exception_handler(TerminalError)
    def bad_request(request: Request, e: TerminalError):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": str(e)}, status_code=400)
        return page(request, "error.html", 400, error=str(e))

    @app.exception_handler(duckdb.Error)
    def query_failed(request: Request, e: duckdb.Error):  # a view that cannot be read: say which, not a traceback
        error = f"the archive could not be read: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": error}, status_code=500)
        return page(request, "error.html", 500, error=error)

    @app.get("/", response_class=HTMLResponse)
    def rollouts(request: Request, task: str = "", stage: str = "", iteration: str = "", status: str = "",
                 min_score: str = "", max_score: str = "", sort: str = "started_at", desc: int = 1):
        f = RolloutFilter(task=_opt(task), stage=_opt(stage, int), iteration=_opt(iteration, int),
                          status=_opt(status), min_score=_opt(min_score, float), max_score=_opt(max_score, float),
                          sort=sort, desc=bool(desc))
        t0 = time.perf_counter()
        result = viewer.rollouts(f)
        return page(request, "rollouts.html", f=f, columns=ROLLOUT_COLUMNS, statuses=STATUSES,
                    query_s=time.perf_counter() - t0, params=dict(request.query_params), **result)

    @app.get("/rollouts/{rollout_id}", response_class=HTMLResponse)
    def rollout(request: Request, rollout_id: str):
        t0 = time.perf_counter()
        data = viewer.rollout(rollout_id)
        if len(data["steps"]) > first_steps:  # the script asks for the rest in a moment: keep them at hand
            with lock:
                while len(later) >= 8:
                    later.pop(next(iter(later)))
                later[(rollout_id, flushes())] = data["steps"]
        return page(request, "rollout.html", r=data, query_s=time.perf_counter() - t0, first_steps=first_steps)

    @app.get("/rollouts/{rollout_id}/steps", response_class=HTMLResponse)
    def later_steps(request: Request, rollout_id: str, start: int = 0):
        steps = later.get((rollout_id, flushes())) or viewer.conversation(rollout_id)
        return templates.TemplateResponse(request, "_steps.html", {"steps": steps[start:]})

    @app.get("/api/rollouts/{rollout_id}/steps/{step_idx}")
    def step(rollout_id: str, step_idx: int):
        return as_jsonable(viewer.step(rollout_id, step_idx))

    @app.get("/api/rollouts/{rollout_id}/overlay")
    def rollout_overlay(rollout_id: str, ref: str):
        ov = overlay(settings.home, ref, rollout_id)
        ov["steps"] = {str(k): v for k, v in ov["steps"].items()}
        return as_jsonable(ov)

    @app.get("/sql", response_class=HTMLResponse)
    def sql(request: Request, q: str = ""):
        table, error, elapsed = None, None, None
        if q.strip():
            t0 = time.perf_counter()
            try:
                table = catalog.arrow(q)
            except TerminalError as e:
                error = str(e)
            elapsed = time.perf_counter() - t0
        rows = table.slice(0, SQL_ROWS_SHOWN).to_pylist() if table is not None else []
        return page(request, "sql.html", q=q, error=error, elapsed=elapsed, rows=rows,
                    columns=table.column_names if table is not None else [],
                    n_rows=table.num_rows if table is not None else 0, shown=SQL_ROWS_SHOWN)

    @app.get("/sql.csv")
    def sql_csv(q: str):
        return Response(csv_bytes(catalog.arrow(q)), media_type="text/csv",
                        headers={"Content-Disposition": 'attachment; filename="klong-query.csv"'})

    @app.get("/plots", response_class=HTMLResponse)
    def plots(request: Request, plan: str = ""):
        plans = [r["plan"] for r in catalog.arrow("SELECT DISTINCT plan FROM rl_iterations ORDER BY 1").to_pylist()]
        return page(request, "plots.html", figures=list(FIGURES), plan=plan, plans=plans)

    @app.get("/plots/{name}.png")
    def plot(name: str, plan: str = ""):
        if name not in FIGURES:
            raise NotFound(f"no figure {name!r} (figures: {', '.join(FIGURES)})")
        key = (name, plan, archive_state())
        png = figures.get(key)
        if png is None:
            png = render(name, catalog, plan or None)
            with lock:
                if len(figures) >= 64:
                    figures.clear()
                figures[key] = png
        return Response(png, media_type="image/png")

    @app.get("/blacklist", response_class=HTMLResponse)
    def blacklist(request: Request):
        return page(request, "blacklist.html", hits=viewer.blacklist_hits())

    return app


def csv_bytes(table: pa.Table) -> bytes:
    """A query result as CSV (header, `\\n` line ends); nested values as JSON text, bytes as hex."""
    for i, field in enumerate(table.schema):
        if pa.types.is_nested(field.type) or pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type):
            text = [None if v is None else v.hex() if isinstance(v, bytes) else json.dumps(v, default=str)
                    for v in table.column(i).to_pylist()]
            table = table.set_column(i, field.name, pa.array(text, pa.string()))
    buf = io.BytesIO()
    pl.from_arrow(table).write_csv(buf)
    return buf.getvalue()


def serve(app: FastAPI, port: int = 8765, host: str = "127.0.0.1") -> None:
    """Serves until interrupted (uvicorn, one process); ConfigError when the port is taken."""
    import socket

    import uvicorn

    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot serve on {host}:{port}: {e.strerror} (pick another --port)") from None
    uvicorn.run(app, host=host, port=port, log_level="warning")


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 in a daemon thread; the context value is the base URL."""

    def __init__(self, app: FastAPI, port: int = 0):
        import uvicorn

        from klong.broker import free_port

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
