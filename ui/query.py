"""Bounded SQL for `klong ui`: every query the viewer runs for a user has a time limit, a row cap and a byte
cap, streams its rows, and stops when its client leaves.

    limits = Limits(timeout_s=30, max_rows=1_000_000, max_bytes=256 << 20)
    q = BoundedQuery(catalog, "SELECT * FROM steps", limits).start()
    for batch in q.batches():            # pyarrow.RecordBatch, in order; raises QueryStopped at a limit
        ...
    q.cancel()                           # from any thread: the client left

How: the query runs in its own thread on its own DuckDB connection (Catalog.connect: the read-only views and
lock-down, DuckDB's `memory_limit` and no `temp_directory`: nothing spills, so nothing spilled is readable). A
timer calls the connection's `interrupt()` at the time limit, wherever the query is (planning, a blocking
aggregate, streaming), and again every 20 ms until the query's thread ends (DuckDB forgets an interrupt that
falls between two of its calls); `cancel()` does the same. Rows come through DuckDB's Arrow stream
(`to_arrow_reader`), a few batches ahead of the consumer (a bounded queue: a slow client slows the query
instead of filling memory), so a 40 M-row result never sits in memory whole. At a cap the query is stopped and
the caller told (never a silently short result).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import duckdb
import pyarrow as pa

from schemas.errors import TerminalError
from store.catalog import Catalog, QueryError, check_read_only

BATCH_ROWS = 2048  # rows per Arrow batch from DuckDB's stream
AHEAD = 4  # batches the query may run ahead of its consumer


@dataclass(frozen=True)
class Limits:
    """What one query may take: wall time (s), rows, bytes (Arrow in memory; CSV bytes for a download)."""

    timeout_s: float = 30.0
    max_rows: int = 1_000_000
    max_bytes: int = 256 << 20

    def check(self) -> None:
        if not self.timeout_s > 0:
            raise QueryError(f"a query time limit must be > 0 s, not {self.timeout_s}")
        if self.max_rows < 1 or self.max_bytes < 1:
            raise QueryError(f"row and byte caps must be >= 1 (got {self.max_rows} rows, {self.max_bytes} bytes)")


class QueryStopped(QueryError):
    """A query stopped before its end: its time limit, a cap, or its client left. `reason` says which."""

    def __init__(self, reason: str, message: str):
        self.reason = reason  # "timeout" | "rows" | "bytes" | "cancelled"
        super().__init__(message)


_DONE = object()


class BoundedQuery:
    """One user query under `limits` (see the module docstring). `start()` returns self; `batches()` may be
    iterated once; `cancel()` and the timer stop it from any thread."""

    def __init__(self, catalog: Catalog, query: str, limits: Limits, running: Optional[set] = None,
                 params: Optional[dict] = None):
        """`running`: a set the query is in while its thread runs (the app's view of the queries in flight);
        `params`: values of the last statement's `$name` parameters (untrusted text goes in these, never into SQL)."""
        limits.check()
        if not query.strip():
            raise QueryError("empty query")
        self.catalog, self.query, self.limits, self.params = catalog, query, limits, params
        self.columns: Optional[list[str]] = None
        self.rows = 0
        self.started_at: Optional[float] = None
        self.ended_at: Optional[float] = None
        self.running = running
        self._out: queue.Queue = queue.Queue(maxsize=AHEAD)
        self._con: Optional[duckdb.DuckDBPyConnection] = None
        self._lock = threading.Lock()  # guards _con and _stop between the query thread and cancel()
        self._stop: Optional[QueryStopped] = None
        self._timer: Optional[threading.Timer] = None
        self._thread = threading.Thread(target=self._run, name="klong-ui-query", daemon=True)

    def start(self) -> "BoundedQuery":
        self.started_at = time.monotonic()
        if self.running is not None:
            self.running.add(self)
        self._timer = threading.Timer(self.limits.timeout_s, self._expire)
        self._timer.daemon = True
        self._timer.start()
        self._thread.start()
        return self

    @property
    def elapsed_s(self) -> float:
        """Seconds from the start to the end of its thread (to now while it runs)."""
        if self.started_at is None:
            return 0.0
        return (self.ended_at if self.ended_at is not None else time.monotonic()) - self.started_at

    @property
    def stopped(self) -> Optional[str]:
        """Why the query was stopped ("timeout", "cancelled", ...), None if it was not."""
        return None if self._stop is None else self._stop.reason

    def _halt(self, stop: QueryStopped) -> None:
        with self._lock:
            first = self._stop is None  # a query stopped before is ending already, or has its interrupter
            if first:
                self._stop = stop
        if first:
            threading.Thread(target=self._interrupt_until_done, name="klong-ui-interrupt", daemon=True).start()

    def _interrupt_until_done(self) -> None:
        """Interrupts the query's connection every 20 ms until its thread ends. One interrupt is not enough:
        DuckDB forgets an interrupt that comes between two of its calls (the next call then runs uninterrupted,
        for hours), and the thread makes several (statements, the read-only check, the query). A stop that
        comes before the connection exists is seen by the thread itself (`_stream`)."""
        while self._thread.is_alive():
            with self._lock:
                if self._con is not None:
                    self._con.interrupt()  # DuckDB stops at its next check, within milliseconds
            self._thread.join(0.02)

    def _expire(self) -> None:
        self._halt(QueryStopped("timeout", f"stopped at the query time limit of {self.limits.timeout_s:g} s "
                                           "(klong ui --sql-timeout); narrow the query (WHERE, LIMIT)"))

    def join(self, timeout: float = 30.0) -> None:
        """Waits for the query's thread to end (its connection closed)."""
        self._thread.join(timeout)

    def cancel(self) -> None:
        """Stops the query (the client left); idempotent."""
        self._halt(QueryStopped("cancelled", "the query was cancelled: its client left"))

    def _put(self, item) -> bool:
        """Hands `item` to the consumer; False once the query was stopped (the consumer may be gone)."""
        while True:
            if self._stop is not None:
                return False
            try:
                self._out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue

    def _run(self) -> None:
        try:
            self._stream()
        except QueryStopped as e:
            self._put_final(e)
        except duckdb.InterruptException:
            self._put_final(self._stop)
        except (duckdb.Error, OSError) as e:  # pyarrow's stream reports an interrupt as OSError
            self._put_final(self._stop if self._stop is not None else QueryError(_one_line(e)))
        except TerminalError as e:
            self._put_final(e)
        finally:
            if self._timer is not None:
                self._timer.cancel()
            with self._lock:
                con, self._con = self._con, None
            if con is not None:
                con.close()
            self.ended_at = time.monotonic()
            if self.running is not None:
                self.running.discard(self)

    def _put_final(self, item) -> None:
        """The last item, even after a stop (the consumer may still be waiting for it)."""
        try:
            self._out.put(item, timeout=1.0)
        except queue.Full:  # the consumer is gone and the queue full: nobody to tell
            pass

    def _stream(self) -> None:
        con = self.catalog.connect(self.query)
        with self._lock:
            self._con = con
            if self._stop is not None:  # timed out or cancelled while the views were being made
                raise self._stop
        try:
            statements = con.extract_statements(self.query)
        except duckdb.Error as e:
            raise QueryError(f"SQL does not parse: {_one_line(e)}") from e
        if not statements:
            raise QueryError("empty query")
        check_read_only(con, statements)
        for st in statements[:-1]:
            con.execute(st)
        reader = con.sql(statements[-1].query, params=self.params).to_arrow_reader(BATCH_ROWS)
        self.columns = list(reader.schema.names)
        if not self._put(reader.schema):
            return
        n_bytes = 0
        for batch in reader:
            self.rows += batch.num_rows
            n_bytes += batch.nbytes
            if self.rows > self.limits.max_rows:
                self._stop = QueryStopped("rows", "")
                raise QueryStopped("rows", f"the result has more than {self.limits.max_rows:,} rows "
                                           "(klong ui --sql-max-rows); narrow the query (WHERE, LIMIT)")
            if n_bytes > self.limits.max_bytes:
                self._stop = QueryStopped("bytes", "")
                raise QueryStopped("bytes", f"the result is larger than {self.limits.max_bytes / 2**20:,.0f} MiB "
                                            "(klong ui --sql-max-mb); select fewer columns or rows")
            if not self._put(batch):
                return
        self._put(_DONE)

    def schema(self, wait_s: Optional[float] = None) -> pa.Schema:
        """The result's schema once the query runs (raises its error or stop)."""
        item = self._get(wait_s)
        if not isinstance(item, pa.Schema):
            raise QueryError(f"expected the result's schema, got {type(item).__name__}")
        return item

    def next_batch(self, wait_s: Optional[float] = None) -> Optional[pa.RecordBatch]:
        """The next batch, None at the end; raises the query's error or stop. With `wait_s`, raises
        queue.Empty when nothing came in that time (the caller checks on its client and asks again)."""
        item = self._get(wait_s)
        return None if item is _DONE else item

    def _get(self, wait_s: Optional[float]):
        item = self._out.get(timeout=wait_s) if wait_s is not None else self._out.get()
        if isinstance(item, Exception):
            raise item
        return item

    def batches(self) -> Iterator[pa.RecordBatch]:
        self.schema()
        while (batch := self.next_batch()) is not None:
            yield batch


def _one_line(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "Out of Memory" in text:  # the viewer never spills to disk (app.py): say what to do
        text += " (the viewer's queries run in memory, without spilling: narrow the query or raise --memory-limit)"
    return text
