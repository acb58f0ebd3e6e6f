"""Replay: rebuild a dataset version from the events it was built from and compare content hashes.

    klong replay web-rl@3                # from the archive: the manifest's flush directories and config
    klong replay web-rl@3 --from-kafka   # re-archive the topics from Kafka first, then the same

From the archive (`Settings.archive`: the home's directory or a bucket prefix, whose objects are read
from verified local copies, store.archive_cache): the manifest records the exact input set (archive flush
directories, archive-relative, so the same on disk and in a bucket), the kind, the config and the
tokenizer fingerprint; the version is rebuilt from those into a scratch directory
(`datasets/_tmp/`) and its content hash compared with the manifest's. The stored files are hashed too,
so a modified or corrupted file is reported even when the rebuild matches the manifest.

From Kafka: the topics the input set names are read again from their earliest offsets by a real
`consumers.sink.Sink` into a fresh scratch home (`HOME/_replay/<id>/`, own consumer group so the real
sink's committed offsets are never touched; the claim-check blob directory is shared by a symlink).
The new archive is cut into different flush directories, so the selection is by Kafka coordinates:
exactly the offsets of the recorded per-partition watermark (`input.watermark`: topic incarnation and
merged offset ranges). Events that arrived after the build sit at higher offsets and are left out;
if the topic was recreated since (another topic id) or retention removed offsets, Kafka no longer holds
the events and the replay says so. `progress(stage, count)` (optional) hears how far each stage is
(`klong replay` shows it as progress bars on a terminal). The content hash never depends on file boundaries, event ids of
duplicates, or timestamps of the build, so the same events give the same hash either way.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from consumers.materialize import DatasetConfig, InputSet, materialize
from core.settings import Settings, Topics
from schemas.errors import KlongError
from store import datasets as ds
from store.archive_cache import cache_dir
from core.objstore import is_s3


@dataclass(frozen=True)
class _ReplayTopics(Topics):
    """Same topic names, another consumer group: a replay must not move the real sink's offsets."""

    group: str = ""

    @property
    def sink_group(self) -> str:
        return self.group


@dataclass
class ReplayReport:
    ref: str
    source: str  # "archive" | "kafka"
    recorded_hash: str  # in the manifest
    stored_hash: Optional[str]  # of the files as they are now (None: unreadable)
    rebuilt_hash: Optional[str]  # of the rebuild (None: nothing could be rebuilt)
    differences: list[str] = field(default_factory=list)
    scratch: Optional[Path] = None  # kept rebuild, when asked

    @property
    def identical(self) -> bool:
        return not self.differences and self.recorded_hash == self.stored_hash == self.rebuilt_hash


def replay(settings: Settings, ref: str, from_kafka: bool = False, keep: bool = False,
           progress: Optional[Callable[[str, int], None]] = None) -> ReplayReport:
    home = Path(settings.home)
    progress = progress or (lambda stage, n: None)
    ds.load_manifest(home, ref, archive=settings.archive)  # a version only in the archive's bucket: fetched
    version = ds.DatasetVersion(home, ref)
    m = version.manifest
    report = ReplayReport(version.ref, "kafka" if from_kafka else "archive", m["content_hash"], None, None)
    try:
        report.stored_hash = version.actual_hash()
    except ds.DatasetError as e:
        report.differences.append(f"stored dataset: {e}")
    if report.stored_hash and report.stored_hash != m["content_hash"]:
        stored = ds.stored_digests(version.path)
        bad = [t for t, d in zip(("tokens", "samples"), stored) if d != m["tables"][t]["digest"]]
        report.differences.append(f"stored dataset: {', '.join(bad) or 'manifest'} no longer match the manifest "
                                  "(modified or corrupted after the build)")

    scratch_home = None
    try:
        if from_kafka:
            scratch_home = home / "_replay" / uuid.uuid4().hex[:12]
            inputs = _rearchive(settings, m, scratch_home, report, progress)
        else:
            archive = settings.archive  # a directory, or a bucket prefix read through local copies
            inputs = InputSet(archive, tuple(m["input"]["flushes"]), tuple(tuple(r) for r in m["input"].get("ranges", [])),
                              cache=cache_dir(home, archive) if is_s3(archive) else None)
            present = inputs.present()
            missing = [f for f in inputs.flushes if f not in present]
            if missing:
                report.differences.append(f"archive: {len(missing)} recorded flush directories are gone "
                                          f"(first: {missing[0]})")
        if inputs is None:
            return report
        out = ds.new_build_dir(home)
        try:
            with ds.report_progress(lambda rollouts, tokens: progress("rebuilding", rollouts)):
                rebuilt = materialize(inputs, m["kind"], DatasetConfig.from_mapping(m["config"]), out)
            report.rebuilt_hash = rebuilt["content_hash"]
            if rebuilt["content_hash"] != m["content_hash"]:
                report.differences += _compare(m, rebuilt, version.path, out)
        finally:
            if keep:
                report.scratch = out
            else:
                ds.discard(out)
    finally:
        if scratch_home is not None and not keep:
            shutil.rmtree(scratch_home, ignore_errors=True)
    return report


def _rearchive(settings: Settings, m: dict, scratch: Path, report: ReplayReport,
               progress: Callable[[str, int], None]) -> Optional[InputSet]:
    """Reads the recorded topics again from Kafka into `scratch`; returns the recorded offsets there."""
    from consumers.sink import Sink  # needs Kafka: imported only here

    scratch.mkdir(parents=True)
    if settings.blob_dir.exists():  # claim-checked steps resolve against the same blobs
        (scratch / "blobs").symlink_to(settings.blob_dir.resolve())
    water = m["input"]["watermark"]
    topics = sorted({key.split("/")[0] for key in water})
    replay_settings = Settings(home=scratch, bootstrap_servers=settings.bootstrap(), partitions=settings.partitions,
                               topics=_ReplayTopics(settings.topics.prefix, group=f"{settings.topics.prefix}.replay-"
                                                                                 f"{scratch.name}"),
                               security=settings.security)
    try:
        stats = Sink(replay_settings, topics=topics).run(
            until_idle=True, progress=lambda st: progress("re-archiving from Kafka", st.events))
        progress("re-archiving from Kafka", stats.events)  # the last flush completes after the sink's last report
    except KlongError as e:
        report.differences.append(f"kafka: cannot re-read the topics: {e}")
        return None
    have = InputSet.scan(replay_settings.archive_dir)
    got = have.watermark()
    ranges, keep = [], set()
    for key, want in water.items():
        topic, topic_id, part = key.split("/")
        if key not in got:
            now = sorted({k.split("/")[1] for k in got if k.split("/")[0] == topic}) or ["none"]
            report.differences.append(f"kafka: {topic} partition {part} of incarnation {topic_id} is gone (topic id "
                                      f"now {', '.join(now)}: the topic was recreated); replay from the archive")
            continue
        for a, b in want:
            if not any(x <= a and b <= y for x, y in got[key]):
                report.differences.append(f"kafka: offsets {a}..{b} of {topic} partition {part} are no longer "
                                          f"held (Kafka has {got[key]}: retention?)")
            ranges.append((topic, int(part), a, b))
        keep.add(f"{topic}/{topic_id}/")
    flushes = tuple(f for f in have.flushes if any(f.startswith(k) for k in keep))
    return InputSet(have.archive, flushes, tuple(ranges))


def _compare(recorded: dict, rebuilt: dict, stored_dir: Path, rebuilt_dir: Path) -> list[str]:
    """What differs between a manifest and a rebuild, in a few lines."""
    out = []
    for key in ("kind", "config", "tokenizer", "pending"):
        if recorded[key] != rebuilt[key]:
            out.append(f"{key}: {_short(recorded[key])} -> {_short(rebuilt[key])}")
    for section in ("counts", "drops"):
        a, b = recorded[section], rebuilt[section]
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                out.append(f"{section}.{k}: {_short(a.get(k))} -> {_short(b.get(k))}")
    for t in ("tokens", "samples"):
        if recorded["tables"][t]["digest"] != rebuilt["tables"][t]["digest"]:
            out.append(f"{t}: content differs (digest {recorded['tables'][t]['digest'][:12]} -> "
                       f"{rebuilt['tables'][t]['digest'][:12]})")
    try:
        before = set(pq.read_table(stored_dir / ds.TOKENS, columns=["rollout_id"]).column(0).to_pylist())
        after = set(pq.read_table(rebuilt_dir / ds.TOKENS, columns=["rollout_id"]).column(0).to_pylist())
        if after - before:
            out.append(f"rollouts added: {len(after - before)} ({', '.join(sorted(after - before)[:3])}...)")
        if before - after:
            out.append(f"rollouts removed: {len(before - after)} ({', '.join(sorted(before - after)[:3])}...)")
    except (OSError, pa.ArrowException):
        pass  # the stored files are unreadable: already reported
    return out or ["content hash differs"]


def _short(v, n: int = 80) -> str:
    s = str(v)
    return s if len(s) <= n else s[: n - 3] + "..."
