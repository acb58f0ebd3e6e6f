"""The tasks the judge grades against: the latest registered version of each, refreshed on a miss.

    cache = TaskCache(settings)
    task = cache.get("fre")        # ResolvedTask (paper, rubric, addenda); UnknownTask if it is not registered

Versions come from the archive (`producers.tasks.ARCHIVED_TASKS_SQL`) and the tasks topic; the newest
registration of a task id wins. A miss refreshes at most once per `min_refresh_s`, so a stream of requests
for an unknown task does not hammer Kafka.
"""

from __future__ import annotations

import logging
import threading
import time

from core.settings import Settings
from producers.tasks import ARCHIVED_TASKS_SQL, ResolvedTask, payload_from_row, read_task_events, resolve_task
from schemas.claimcheck import BlobStore
from schemas.errors import BrokerError, TerminalError
from schemas.events import TaskPayload

log = logging.getLogger("klong.judge")


class UnknownTask(TerminalError):
    """A request names a task that is not registered."""


class TaskCache:
    """Latest registered version of each task, from the archive and the tasks topic; refreshed on a miss."""

    def __init__(self, settings: Settings, min_refresh_s: float = 1.0):
        self.settings, self.min_refresh_s = settings, min_refresh_s
        self._payloads: dict[str, tuple[float, TaskPayload]] = {}
        self._resolved: dict[str, ResolvedTask] = {}
        self._lock = threading.Lock()
        self._refreshed = -1e9

    def refresh(self) -> None:
        from store.catalog import Catalog

        found = [(r["t"], payload_from_row(r)) for r in Catalog(self.settings).arrow(ARCHIVED_TASKS_SQL).to_pylist()]
        try:
            found += [(ev.produced_at.timestamp(), ev.payload) for ev in read_task_events(self.settings)]
        except BrokerError as e:
            log.warning("judge: cannot read the tasks topic (%s); using archived tasks only", e)
        for t, p in found:
            if p.task_id not in self._payloads or t >= self._payloads[p.task_id][0]:
                self._payloads[p.task_id] = (t, p)
        self._refreshed = time.monotonic()

    def get(self, task_id: str) -> ResolvedTask:
        with self._lock:
            if task_id not in self._payloads and time.monotonic() - self._refreshed > self.min_refresh_s:
                self.refresh()
            if task_id not in self._payloads:
                raise UnknownTask(f"task {task_id!r} is not registered (run `klong tasks import`)")
            payload = self._payloads[task_id][1]
            if payload.content_hash not in self._resolved:
                self._resolved[payload.content_hash] = resolve_task(payload, BlobStore(self.settings.blob_dir))
            return self._resolved[payload.content_hash]
