"""The outbox's on-disk spool: append-only segment files of (topic, key, value) records.

    spool = Spool(directory, segment_bytes=8 << 20)   # locks the directory, scans what is there
    spool.recovered                                 # [SpoolEntry, ...] found on disk, in order
    entry = spool.append(topic, key, value)         # written (page cache): survives a process crash
    spool.sync()                                    # fsync'd: survives a machine crash
    topic, key, value = spool.read(entry)
    spool.delete_segment(entry.segment)             # once every record in it is done

Record format: `u32 body length | u32 crc32(body) | body`, body = `u16 len(topic) | u16 len(key) |
topic | key | value`. A crash can leave a torn last record (short or bad crc): the scan at open
truncates the segment there and logs how many bytes it dropped. Segment files are named
`seg-<n>.log` with n increasing, so sorting names gives write order. Beside each, `seg-<n>.notes`
(`spool.note(entry, ...)`, read back as `spool.notes`) says what became of its records (acked at a
Kafka position, done), so a new process does not resend them. An exclusive `fcntl.flock` on
`DIR/LOCK` keeps a second process (or a second Outbox) off the same spool.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.procs import fsync_path
from schemas.errors import ConfigError

log = logging.getLogger("klong.outbox")

_HEADER = struct.Struct("<II")  # body length, crc32(body)
_BODY_HEAD = struct.Struct("<HH")  # len(topic), len(key)
_MAX_BODY = 16 << 20  # far above any valid record: a larger length field means a torn header


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    segment: int
    pos: int  # byte offset of the record header in its segment
    size: int  # header + body bytes
    topic: str


def _seg_name(n: int) -> str:
    return f"seg-{n:012d}.log"


def _notes_name(n: int) -> str:
    return f"seg-{n:012d}.notes"


class Spool:
    """Segment files in one directory. `append`/`sync` may be called from any thread;
    `read`/`delete_segment` from one reader thread."""

    def __init__(self, directory: str | os.PathLike, segment_bytes: int = 8 << 20) -> None:
        self.directory = Path(directory)
        self.segment_bytes = segment_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._take_lock()
        self._lock = threading.Lock()
        self._write_fd: int | None = None
        self._write_seg = 0
        self._write_size = 0
        self._read_fds: dict[int, int] = {}
        self.recovered: list[SpoolEntry] = []
        segments = sorted(int(p.name[4:-4]) for p in self.directory.glob("seg-*.log"))
        for n in segments:
            self.recovered.extend(self._scan(n))
        self._next_seg = (segments[-1] + 1) if segments else 1
        self.segments_on_disk = set(segments)
        # What became of records (sidecar `seg-N.notes`, see `note`): (segment, pos) -> fields.
        self.notes: dict[tuple[int, int], list[str]] = {}
        for n in segments:
            self._read_notes(n)
        self._note_files: dict[int, Any] = {}
        for p in self.directory.glob("seg-*.notes"):  # a sidecar whose segment is gone
            if int(p.name[4:-6]) not in self.segments_on_disk:
                p.unlink(missing_ok=True)

    def _take_lock(self) -> int:
        path = self.directory / "LOCK"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"outbox {self.directory} is in use by another producer (pid {holder}); "
                "give each producer process its own outbox directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd

    def _scan(self, n: int) -> list[SpoolEntry]:
        path = self.directory / _seg_name(n)
        data = path.read_bytes()
        entries, pos = [], 0
        while pos + _HEADER.size <= len(data):
            length, crc = _HEADER.unpack_from(data, pos)
            end = pos + _HEADER.size + length
            if length < _BODY_HEAD.size or length > _MAX_BODY or end > len(data):
                break
            body = data[pos + _HEADER.size:end]
            if zlib.crc32(body) != crc:
                break
            topic_len, _ = _BODY_HEAD.unpack_from(body)
            topic = body[_BODY_HEAD.size:_BODY_HEAD.size + topic_len].decode()
            entries.append(SpoolEntry(n, pos, end - pos, topic))
            pos = end
        if pos < len(data):
            # A write torn by a crash (or garbage): everything from here on is not a whole record.
            log.warning("outbox: %s ends with %d bytes that are not a whole record (torn write); truncated",
                        path, len(data) - pos)
            os.truncate(path, pos)
        return entries

    def _read_notes(self, n: int) -> None:
        path = self.directory / _notes_name(n)
        if path.exists():
            for line in path.read_text(errors="replace").split("\n")[:-1]:  # a torn last line has no newline
                pos, _, rest = line.partition(" ")
                if pos.isdigit() and rest:
                    self.notes[(n, int(pos))] = rest.split(" ")

    def note(self, entry: SpoolEntry, *fields: str) -> None:
        """Appends what became of one record (e.g. `acked P OFFSET TOPIC_ID`, `done`) to its segment's
        sidecar, so a new process confirms instead of resending. Not fsync'd: a lost line costs a resend
        (at-least-once), never a record. Called by one thread (the outbox sender)."""
        f = self._note_files.get(entry.segment)
        if f is None:
            f = self._note_files[entry.segment] = open(self.directory / _notes_name(entry.segment), "a")
        f.write(" ".join((str(entry.pos), *fields)) + "\n")

    def flush_notes(self) -> None:
        for f in self._note_files.values():
            f.flush()

    def append(self, topic: str, key: bytes, value: bytes) -> SpoolEntry:
        t = topic.encode()
        body = b"".join((_BODY_HEAD.pack(len(t), len(key)), t, key, value))
        record = _HEADER.pack(len(body), zlib.crc32(body)) + body
        with self._lock:
            if self._write_fd is None or (self._write_size and self._write_size + len(record) > self.segment_bytes):
                self._rotate()
            # One write call per record: a crash tears at most this record, which the scan detects.
            os.write(self._write_fd, record)
            entry = SpoolEntry(self._write_seg, self._write_size, len(record), topic)
            self._write_size += len(record)
            return entry

    def _rotate(self) -> None:
        if self._write_fd is not None:
            os.fsync(self._write_fd)
            os.close(self._write_fd)
        self._write_seg, self._next_seg = self._next_seg, self._next_seg + 1
        path = self.directory / _seg_name(self._write_seg)
        self._write_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        self._write_size = 0
        self.segments_on_disk.add(self._write_seg)
        fsync_path(self.directory)  # the new file's name must survive a machine crash too

    @property
    def write_segment(self) -> int:
        """The segment appends go to now (0 before the first append); never deleted while current."""
        return self._write_seg

    def sync(self) -> None:
        with self._lock:
            if self._write_fd is None:
                return
            fd = os.dup(self._write_fd)  # a rotation may close the original while we fsync
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def read(self, entry: SpoolEntry) -> tuple[str, bytes, bytes]:
        fd = self._read_fds.get(entry.segment)
        if fd is None:
            fd = self._read_fds[entry.segment] = os.open(self.directory / _seg_name(entry.segment), os.O_RDONLY)
        raw = os.pread(fd, entry.size, entry.pos)
        topic_len, key_len = _BODY_HEAD.unpack_from(raw, _HEADER.size)
        start = _HEADER.size + _BODY_HEAD.size
        return (raw[start:start + topic_len].decode(), raw[start + topic_len:start + topic_len + key_len],
                raw[start + topic_len + key_len:])

    def delete_segment(self, n: int) -> None:
        if n == self._write_seg:
            raise ValueError("cannot delete the segment being written")
        fd = self._read_fds.pop(n, None)
        if fd is not None:
            os.close(fd)
        (self.directory / _seg_name(n)).unlink(missing_ok=True)
        f = self._note_files.pop(n, None)
        if f is not None:
            f.close()
        (self.directory / _notes_name(n)).unlink(missing_ok=True)
        with self._lock:
            self.segments_on_disk.discard(n)

    def close(self) -> None:
        with self._lock:
            if self._write_fd is not None:
                os.fsync(self._write_fd)
                os.close(self._write_fd)
                self._write_fd = None
        for fd in self._read_fds.values():
            os.close(fd)
        self._read_fds.clear()
        for f in self._note_files.values():
            f.close()
        self._note_files.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
