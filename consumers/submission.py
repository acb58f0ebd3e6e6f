"""A submission to grade: the text files of a snapshot, read into memory and never extracted to disk.

    sub = load_submission(settings, "sha256:...")   # Submission(ref, files {path: text}, skipped paths)

A snapshot is `sha256:...` (a tar or tar.gz in the BlobStore, as `producers.judge_requests.store_snapshot`
writes it) or a directory / tarball under the data home (a path outside it is refused). Binary files, files
over `max_file_bytes` and what exceeds `max_total_bytes` are listed as skipped, not read.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from core.settings import Settings
from producers.judge_requests import SKIP_DIRS
from schemas.claimcheck import BlobStore
from schemas.errors import TerminalError, ValidationError


class SubmissionError(TerminalError):
    """A snapshot reference cannot be read."""


@dataclass(frozen=True)
class Submission:
    ref: Optional[str]
    files: dict  # path -> text (text files only, each at most max_file_bytes)
    skipped: tuple  # paths not shown: binary or too large


def _resolve_path(settings: Settings, ref: str) -> Path:
    """A snapshot path must lie under the data home (relative paths are relative to it)."""
    home = settings.home.resolve()
    path = Path(ref)
    path = (path if path.is_absolute() else home / path).resolve()
    if path != home and home not in path.parents:
        raise SubmissionError(f"snapshot {ref!r} is outside the data home {home}")
    if not path.exists():
        raise SubmissionError(f"snapshot {ref!r} not found ({path})")
    return path


def _text(data: bytes) -> Optional[str]:
    if b"\0" in data[:8192]:
        return None
    return data.decode("utf-8", errors="replace")


def load_submission(settings: Settings, ref: Optional[str], *, max_file_bytes: int = 2 << 20,
                    max_total_bytes: int = 64 << 20) -> Submission:
    """The files of a snapshot: `sha256:...` (a tar or tar.gz in the BlobStore, as
    `producers.judge_requests.store_snapshot` writes it), or a directory / tarball under the data home.
    Read into memory, never extracted to disk; text files only."""
    if ref is None:
        return Submission(None, {}, ())
    items: list[tuple[str, int, Callable[[], bytes]]] = []
    if ref.startswith("sha256:"):
        try:
            data = BlobStore(settings.blob_dir).get(ref)
        except ValidationError as e:
            raise SubmissionError(str(e)) from e
        items = _tar_items(data, ref)
    else:
        path = _resolve_path(settings, ref)
        if path.is_dir():
            for p in sorted(path.rglob("*")):
                rel = p.relative_to(path)
                if p.is_file() and not p.is_symlink() and not SKIP_DIRS.intersection(rel.parts):
                    items.append((rel.as_posix(), p.stat().st_size, p.read_bytes))
        else:
            items = _tar_items(path.read_bytes(), ref)
    files, skipped, total = {}, [], 0
    for name, size, read in items:
        if size > max_file_bytes or total + size > max_total_bytes:
            skipped.append(name)
            continue
        text = _text(read())
        if text is None:
            skipped.append(name)
            continue
        files[name] = text
        total += size
    return Submission(ref, files, tuple(skipped))


def _tar_items(data: bytes, ref: str) -> list[tuple[str, int, Callable[[], bytes]]]:
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
        members = [m for m in tar.getmembers() if m.isfile()]
    except tarfile.TarError as e:
        raise SubmissionError(f"snapshot {ref} is not a tar archive: {e}") from e
    items = []
    for m in members:
        name = m.name.lstrip("./")
        if SKIP_DIRS.intersection(Path(name).parts):
            continue
        items.append((name, m.size, lambda m=m: tar.extractfile(m).read()))
    return items
