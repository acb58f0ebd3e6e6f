"""Copies a directory tree the agent controls to the host without following anything the agent made.

    src = open_nofollow(f"/proc/{holder_pid}/root", "home/submission")   # through the holder's mounts
    report = copy_tree_nofollow(src, dest, CopyBounds(max_bytes=2 << 30))   # dest: a fresh directory
    report.files, report.bytes, report.skipped                           # what was left behind, and why

Why not tar: extracting an agent-made archive on the host trusts the archive's paths (Python 3.11.7's
`tarfile` data filter can be walked past PATH_MAX, CVE-2025-4517), and running `tar` inside the
sandbox runs whatever the agent put there. Here the runner reads the tree itself, one directory file
descriptor at a time: every name is opened relative to its parent's descriptor with O_NOFOLLOW, so a
symlink (or a directory swapped for one mid-copy) is never followed; special files (FIFOs, devices,
sockets) are skipped, and regular files are re-checked with fstat after the open (O_NONBLOCK: a FIFO
swapped in cannot hang the open). Writes go into a directory this copy created, by descriptor, with
O_CREAT | O_EXCL | O_NOFOLLOW, so no path is ever resolved through something the agent named.

Kept: directories, regular files (the owner's execute bit), and symlinks whose target is relative and
has no `..` component (so it can only point down into the tree; the link is recreated, never followed). Dropped, each with
a reason in the report: other symlinks, special files, and whatever passes the bounds (depth, path
length, file count, total bytes).
"""

from __future__ import annotations

import os
import posixpath
import stat
from dataclasses import dataclass, field
from pathlib import Path

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 20


@dataclass(frozen=True)
class CopyBounds:
    max_depth: int = 64  # directories below the root
    max_path_bytes: int = 2048  # a relative path's length (PATH_MAX is 4096)
    max_files: int = 200_000  # files, links and directories
    max_bytes: int = 2 << 30  # file contents in all


@dataclass
class CopyReport:
    files: int = 0
    bytes: int = 0
    n_skipped: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason), the first 100

    def skip(self, rel: str, reason: str) -> None:
        self.n_skipped += 1
        if len(self.skipped) < 100:
            self.skipped.append((rel, reason))


def open_nofollow(root: str, relative: str) -> int:
    """A directory descriptor for `root/relative`, `root` itself followed (e.g. /proc/PID/root), each
    component of `relative` opened with O_NOFOLLOW."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in [p for p in relative.split("/") if p]:
            nxt = os.open(part, _DIR, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except OSError:
        os.close(fd)
        raise
    return fd


def copy_tree_nofollow(src_fd: int, dest: Path, bounds: CopyBounds = CopyBounds()) -> CopyReport:
    """Copies the tree under directory descriptor `src_fd` into `dest` (created here; must not exist)."""
    os.mkdir(dest, 0o755)
    dest_fd = os.open(dest, _DIR)
    report = CopyReport()
    try:
        _copy_dir(src_fd, dest_fd, "", 0, bounds, report)
    finally:
        os.close(dest_fd)
    return report


def _copy_dir(src_fd: int, dest_fd: int, rel: str, depth: int, bounds: CopyBounds, report: CopyReport) -> None:
    try:
        names = sorted(os.listdir(src_fd))
    except OSError as e:
        return report.skip(rel or ".", f"unreadable directory ({e.strerror})")
    for name in names:
        path = posixpath.join(rel, name)
        if len(os.fsencode(path)) > bounds.max_path_bytes:
            report.skip(path[:200] + "...", f"path longer than {bounds.max_path_bytes} bytes")
            continue
        if report.files >= bounds.max_files:
            report.skip(path, f"more than {bounds.max_files} files")
            continue
        try:
            st = os.stat(name, dir_fd=src_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                if depth + 1 > bounds.max_depth:
                    report.skip(path, f"deeper than {bounds.max_depth} directories")
                    continue
                _copy_subdir(src_fd, dest_fd, name, path, depth + 1, bounds, report)
            elif stat.S_ISREG(st.st_mode):
                _copy_file(src_fd, dest_fd, name, path, bounds, report)
            elif stat.S_ISLNK(st.st_mode):
                _copy_link(src_fd, dest_fd, name, path, report)
            else:
                report.skip(path, "special file (FIFO, socket or device)")
        except OSError as e:  # changed under us (deleted, swapped for a link): left out, never followed
            report.skip(path, f"{e.strerror or e}")


def _copy_subdir(src_fd: int, dest_fd: int, name: str, path: str, depth: int, bounds: CopyBounds,
                 report: CopyReport) -> None:
    sub = os.open(name, _DIR, dir_fd=src_fd)
    try:
        os.mkdir(name, 0o755, dir_fd=dest_fd)
        report.files += 1
        dsub = os.open(name, _DIR, dir_fd=dest_fd)
        try:
            _copy_dir(sub, dsub, path, depth, bounds, report)
        finally:
            os.close(dsub)
    finally:
        os.close(sub)


def _copy_file(src_fd: int, dest_fd: int, name: str, path: str, bounds: CopyBounds, report: CopyReport) -> None:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=src_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return report.skip(path, "not a regular file when opened")
        budget = bounds.max_bytes - report.bytes
        if st.st_size > budget:
            return report.skip(path, f"over the {bounds.max_bytes}-byte copy limit")
        mode = 0o755 if st.st_mode & stat.S_IXUSR else 0o644
        out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dest_fd)
        try:
            copied = 0
            while copied < budget:  # a file growing while it is copied stops at the budget
                data = os.read(fd, min(_CHUNK, budget - copied))
                if not data:
                    break
                os.write(out, data)
                copied += len(data)
        finally:
            os.close(out)
        report.files += 1
        report.bytes += copied
    finally:
        os.close(fd)


def _copy_link(src_fd: int, dest_fd: int, name: str, path: str, report: CopyReport) -> None:
    target = os.readlink(name, dir_fd=src_fd)
    # Only downward links: a '..' can climb out through another link ('c -> .', 'l -> c/..'), which no
    # check on the text alone can rule out; a relative path without '..' only ever descends.
    if not target or target.startswith("/") or ".." in target.split("/") or len(target) > 1024:
        return report.skip(path, f"symlink that may leave the submission ({target[:100]!r})")
    os.symlink(target, name, dir_fd=dest_fd)
    report.files += 1


def extract_tar_nofollow(fileobj, dest: Path, bounds: CopyBounds = CopyBounds()) -> CopyReport:
    """Extracts a tar stream made where the agent had a hand in it (the k8s sandbox's `tar -c` in its Pod)
    into `dest` (created here) by the same rules as `copy_tree_nofollow`: directories and regular files
    only (no links of any kind, no devices), names checked part by part (no absolute path, no `..`),
    everything created by descriptor with O_NOFOLLOW | O_EXCL, bounded. tarfile only parses the
    stream; it never writes (its data filter is what CVE-2025-4517 walks past)."""
    import tarfile

    os.mkdir(dest, 0o755)
    report = CopyReport()
    root = os.open(dest, _DIR)
    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as tar:
            for m in tar:
                parts = [p for p in m.name.split("/") if p not in ("", ".")]
                rel = "/".join(parts)
                if not parts or m.name.startswith("/") or ".." in parts:
                    (report.skip(m.name[:200], "name leaving the destination") if parts else None)
                    continue
                if len(os.fsencode(rel)) > bounds.max_path_bytes or len(parts) > bounds.max_depth + 1:
                    report.skip(rel[:200], "path too long or too deep")
                    continue
                if report.files >= bounds.max_files:
                    report.skip(rel, f"more than {bounds.max_files} files")
                    continue
                if not (m.isdir() or m.isreg()):
                    report.skip(rel, "link or special file")
                    continue
                try:
                    parent = _make_dirs(root, parts[:-1] if m.isreg() else parts)
                except OSError as e:
                    report.skip(rel, f"{e.strerror or e}")
                    continue
                try:
                    if m.isreg():
                        _write_member(tar, m, parent, parts[-1], rel, bounds, report)
                    else:
                        report.files += 1
                finally:
                    os.close(parent)
    finally:
        os.close(root)
    return report


def _make_dirs(root: int, parts: list[str]) -> int:
    """A descriptor of root/parts..., each directory made if missing and opened with O_NOFOLLOW."""
    fd = os.dup(root)
    try:
        for part in parts:
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            nxt = os.open(part, _DIR, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except OSError:
        os.close(fd)
        raise
    return fd


def _write_member(tar, m, parent: int, name: str, rel: str, bounds: CopyBounds, report: CopyReport) -> None:
    if m.size > bounds.max_bytes - report.bytes:
        return report.skip(rel, f"over the {bounds.max_bytes}-byte copy limit")
    mode = 0o755 if m.mode & stat.S_IXUSR else 0o644
    try:
        out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=parent)
    except OSError as e:  # a second member of the same name: the first one stays
        return report.skip(rel, f"{e.strerror or e}")
    try:
        src = tar.extractfile(m)
        while data := src.read(_CHUNK):
            os.write(out, data)
    finally:
        os.close(out)
    report.files += 1
    report.bytes += m.size
