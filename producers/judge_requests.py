"""The producer side of judging: snapshot a submission, ask for a judgment.

    ref = store_snapshot(settings, "/work/rollout-17/submission")      # "sha256:..." (a tar in HOME/blobs)
    rid = request_judgment(outbox, rollout_id=rid, task_id="fre", step_idx=412, priority="train",
                           snapshot_ref=ref)                            # -> request_id

A request goes to `klong.judge.requests.eval` or `.train` by priority (`Topics.for_event`); the judge
worker (`klong judge run`) grades it and emits a `judge_result` with the same request_id. With
`snapshot_ref=None` the worker uses the rollout's latest archived `snapshot` event at or before
`step_idx`. The snapshot tar is deterministic (sorted names, zeroed times and owners), so the same
files give the same reference: content-addressed.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Optional

from core.settings import Settings
from producers.outbox import Outbox
from schemas.claimcheck import BlobStore
from schemas.errors import ValidationError
from schemas.events import JudgeRequested, JudgeRequestedPayload, Priority, new_event, uuid7

# Tool folders left out of a snapshot (and skipped when a directory or tarball snapshot is read).
SKIP_DIRS = frozenset({".git", "__pycache__", ".venv", "venv", "node_modules", ".mypy_cache", ".pytest_cache"})


def request_judgment(outbox: Outbox, *, rollout_id: str, task_id: str, step_idx: int, priority: Priority = "train",
                     snapshot_ref: Optional[str] = None, request_id: Optional[str] = None) -> str:
    """Emits one judge_requested event through the durable outbox; returns its request_id (the
    idempotency key: sending the same request_id twice still gets one result)."""
    request_id = request_id or uuid7()
    outbox.put(new_event(JudgeRequested, rollout_id=rollout_id, payload=JudgeRequestedPayload(
        request_id=request_id, step_idx=step_idx, task_id=task_id, priority=priority, snapshot_ref=snapshot_ref)))
    return request_id


def check_request(settings: Settings, *, rollout_id: str, task_id: str, step_idx: int,
                  snapshot_ref: Optional[str]) -> None:
    """ValidationError naming what is missing when a request could never be graded: an unregistered
    task, a rollout the archive does not hold (or of another task), a snapshot that does not exist (a
    blob not in HOME/blobs, a path not under the home) or, with none given, no archived snapshot of the
    rollout at or before `step_idx`. `klong judge request` runs it before sending."""
    from producers.tasks import latest_task
    from store.catalog import Catalog, sql_str

    if latest_task(settings, task_id) is None:
        raise ValidationError(f"task {task_id!r} is not registered (`klong tasks list`; `klong tasks import DIR`)")
    cat = Catalog(settings)
    rows = cat.arrow(f"SELECT task_id, n_steps FROM rollouts WHERE rollout_id = {sql_str(rollout_id)}").to_pylist()
    if not rows:
        raise ValidationError(f"rollout {rollout_id!r} is not in the archive (unknown, or not archived yet: "
                              "`klong sink run --until-idle`)")
    if rows[0]["task_id"] != task_id:
        raise ValidationError(f"rollout {rollout_id!r} is a rollout of task {rows[0]['task_id']!r}, not {task_id!r}")
    if snapshot_ref is None:
        if not cat.scalar(f"SELECT count(*) FROM snapshots WHERE rollout_id = {sql_str(rollout_id)} "
                          f"AND step_idx <= {int(step_idx)}"):
            raise ValidationError(f"rollout {rollout_id!r} has no archived snapshot at or before step {step_idx}: "
                                  "give one (--snapshot DIR)")
    elif snapshot_ref.startswith("sha256:"):
        if not BlobStore(settings.blob_dir).exists(snapshot_ref):
            raise ValidationError(f"snapshot {snapshot_ref} is not in {settings.blob_dir}")
    else:
        home = settings.home.resolve()
        path = Path(snapshot_ref)
        path = (path if path.is_absolute() else home / path).resolve()
        if not path.exists() or (path != home and home not in path.parents):
            raise ValidationError(f"snapshot {snapshot_ref!r}: no such directory, blob or path under the home {home}")


def snapshot_tar(directory: str | os.PathLike) -> bytes:
    """A deterministic tar of a directory's regular files (symlinks and tool folders left out)."""
    root = Path(directory)
    if not root.is_dir():
        raise ValidationError(f"snapshot source {root} is not a directory")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root)
            if not path.is_file() or path.is_symlink() or SKIP_DIRS.intersection(rel.parts):
                continue
            data = path.read_bytes()
            info = tarfile.TarInfo(rel.as_posix())
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def store_snapshot(settings: Settings, directory: str | os.PathLike) -> str:
    """Puts a directory's files into the BlobStore as one tar; returns its `sha256:` reference."""
    return BlobStore(settings.blob_dir).put(snapshot_tar(directory))
