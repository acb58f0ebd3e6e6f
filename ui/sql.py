"""The SQL box of `klong ui`: `GET /sql` shows the form (runs nothing), `POST /sql` runs the query and shows
its first SHOWN rows, `POST /sql.csv` streams the whole result as CSV.

Both POSTs carry the page's per-process token and must come from the viewer's own origin (ui.guard);
every query runs under the viewer's limits (ui.query: time limit, row and byte caps, DuckDB memory
limit) and is interrupted as soon as its client disconnects. A CSV that hits a limit after its first rows
ends without its closing chunk, so the download fails visibly instead of arriving short.
"""

from __future__ import annotations

import asyncio
import io
import json
import queue
from typing import Optional

import polars as pl
import pyarrow as pa
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, StreamingResponse

from schemas.errors import TerminalError
from store.catalog import Catalog
from ui.guard import check_same_origin
from ui.query import BoundedQuery, Limits

class ClientGone(TerminalError):
    """The client of a query disconnected (nobody reads the answer)."""


SHOWN = 1000  # rows the page shows; the CSV download has them all (up to the caps)
POLL_S = 0.1  # how often a waiting request checks that its client is still there


async def _next(request: Request, q: BoundedQuery, first: bool = False):
    """The query's schema (first) or next batch, waiting in small steps so that a client that left
    cancels the query at once (DuckDB keeps running otherwise)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            return await loop.run_in_executor(None, (q.schema if first else q.next_batch), POLL_S)
        except queue.Empty:
            if await request.is_disconnected():
                q.cancel()
                raise ClientGone("the client left: its query was stopped")


async def _form(request: Request) -> tuple[str, Optional[str]]:
    form = await request.form()
    return str(form.get("q") or ""), (str(form["token"]) if "token" in form else None)


def csv_bytes(table: pa.Table | pa.RecordBatch, header: bool = True) -> bytes:
    """Rows as CSV (`\\n` line ends); nested values as JSON text, bytes as hex."""
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    for i, field in enumerate(table.schema):
        if pa.types.is_nested(field.type) or pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type):
            text = [None if v is None else v.hex() if isinstance(v, bytes) else json.dumps(v, default=str)
                    for v in table.column(i).to_pylist()]
            table = table.set_column(i, field.name, pa.array(text, pa.string()))
    buf = io.BytesIO()
    pl.from_arrow(table).write_csv(buf, include_header=header)
    return buf.getvalue()


def register(app: FastAPI, catalog: Catalog, limits: Limits, token: str, page) -> None:
    """Adds the SQL routes; `page(request, template, status_code, **context)` renders a template. The queries
    in flight are in `app.state.running`."""
    running: set = set()
    app.state.running = running

    def form_page(request: Request, q: str = "", status_code: int = 200, **context) -> HTMLResponse:
        return page(request, "sql.html", status_code, q=q, token=token, limits=limits, shown=SHOWN, **context)

    @app.get("/sql", response_class=HTMLResponse)
    def sql_form(request: Request, q: str = ""):
        return form_page(request, q)  # shows the query, never runs it: a GET changes and costs nothing

    @app.post("/sql", response_class=HTMLResponse)
    async def sql_run(request: Request):
        q, sent = await _form(request)
        check_same_origin(request.method, request.headers, token, sent)
        if not q.strip():
            return form_page(request, q)
        query = BoundedQuery(catalog, q, limits, running).start()
        rows: list[dict] = []
        try:
            schema = await _next(request, query, first=True)
            more = False
            while (batch := await _next(request, query)) is not None:
                rows.extend(batch.slice(0, SHOWN + 1 - len(rows)).to_pylist())
                if len(rows) > SHOWN:
                    more = True
                    break
        except TerminalError as e:
            await asyncio.get_running_loop().run_in_executor(None, query.join)  # its end time is set
            return form_page(request, q, 400, error=str(e), elapsed=query.elapsed_s)
        finally:
            query.cancel()  # the page needs no more rows: stop the query now
        return form_page(request, q, columns=schema.names, rows=rows[:SHOWN], more=more, elapsed=query.elapsed_s)

    @app.post("/sql.csv")
    async def sql_csv(request: Request):
        q, sent = await _form(request)
        check_same_origin(request.method, request.headers, token, sent)
        query = BoundedQuery(catalog, q, limits, running).start()
        try:  # an error before the first rows is an HTTP error with its message
            schema = await _next(request, query, first=True)
            first = await _next(request, query)
        except BaseException:
            query.cancel()
            raise

        async def body():
            sent_bytes = 0
            try:
                head = csv_bytes(schema.empty_table())
                chunk = head if first is None else csv_bytes(first)
                batch = first
                while True:
                    sent_bytes += len(chunk)
                    if sent_bytes > limits.max_bytes:  # ends the response unfinished: the download fails
                        raise TerminalError(f"CSV larger than {limits.max_bytes:,} bytes (klong ui --sql-max-mb)")
                    yield chunk
                    if batch is None:
                        return
                    batch = await _next(request, query)
                    if batch is None:
                        return
                    chunk = csv_bytes(batch, header=False)
            except ClientGone:  # nobody to tell
                return
            finally:
                query.cancel()

        return StreamingResponse(body(), media_type="text/csv",
                                 headers={"Content-Disposition": 'attachment; filename="klong-query.csv"'})
