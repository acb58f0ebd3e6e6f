"""Dataset versions on disk: the layout's names and schemas, where versions live, and their manifests.

    name, n = parse_ref(home, "web-rl")        # -> ("web-rl", latest N); DatasetError if there is none
    version_dir(home, name, n) / MANIFEST      # HOME/datasets/NAME/v<N>/ (or its copy in the cache)

The layout itself (what tokens.parquet and samples.parquet hold) is described in store.datasets. Versions
built here sit under `HOME/datasets/NAME/v<N>/`; versions fetched from the archive's bucket under
`HOME/datasets/_cache/NAME/v<N>/` (store.datasets_s3) and are found beside local ones (a local one wins).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa

from schemas.errors import ConfigError, TerminalError

FORMAT = 2  # layout version of a dataset; part of the content hash (2: per-step sampled ranges, temperature)
DATASETS = "datasets"
TOKENS, SAMPLES, MANIFEST = "tokens.parquet", "samples.parquet", "manifest.json"
ROW_GROUP_TOKENS = 32 << 20  # tokens per row group of tokens.parquet: what a reader holds at once
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # used with fullmatch: `$` would pass "name\n"
_VERSION_DIR = re.compile(r"v(\d+)")

TOKENS_SCHEMA = pa.schema([
    ("rollout_id", pa.string()), ("group_id", pa.string()), ("task_id", pa.string()), ("status", pa.string()),
    ("stage", pa.int32()), ("iteration", pa.int32()), ("prefix_len", pa.int32()), ("prefix_tokens", pa.int64()),
    ("step_offsets", pa.list_(pa.int64())), ("step_assistant", pa.list_(pa.bool_())),
    ("step_loss_start", pa.list_(pa.int32())), ("step_loss_end", pa.list_(pa.int32())),
    ("step_temperature", pa.list_(pa.float32())),
    ("token_ids", pa.list_(pa.int32())), ("logprobs", pa.list_(pa.float32())),
])
SAMPLES_SCHEMA = pa.schema([
    ("rollout_id", pa.string()), ("group_id", pa.string()), ("task_id", pa.string()), ("stage", pa.int32()),
    ("iteration", pa.int32()), ("window_idx", pa.int32()), ("first_turn", pa.int32()), ("last_turn", pa.int32()),
    ("n_turns", pa.int32()), ("first_step", pa.int32()), ("last_step", pa.int32()), ("n_tokens", pa.int64()),
    ("n_loss_tokens", pa.int64()), ("obs_truncated", pa.bool_()), ("prefix_loss", pa.bool_()),
    ("q", pa.float64()), ("advantage", pa.float64()), ("policy_version", pa.int64()), ("staleness", pa.int64()),
    ("span_step", pa.list_(pa.int32())), ("span_start", pa.list_(pa.int32())), ("span_end", pa.list_(pa.int32())),
    ("span_loss", pa.list_(pa.bool_())),
    # the window gives span k (prefix: every prefix step) the context it was generated in (consumers.materialize)
    ("span_same_ctx", pa.list_(pa.bool_())), ("prefix_same_ctx", pa.bool_()),
])


class DatasetError(TerminalError):
    """A dataset version is missing, unreadable, or its files do not match its content hash."""


# ---- names and places ---------------------------------------------------------------------------


def datasets_dir(home: Path | str) -> Path:
    return Path(home) / DATASETS


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name or ""):
        raise ConfigError(f"dataset name {name!r} is not valid: use letters, digits, '.', '_' and '-' "
                          "(starting with a letter or digit)")
    return name


def cache_dir(home: Path | str) -> Path:
    """Where versions fetched from the archive's bucket are kept (store.datasets_s3); found beside local ones."""
    return datasets_dir(home) / "_cache"


def _versions_in(root: Path, name: str) -> set[int]:
    d = root / name
    if not d.is_dir():
        return set()
    return {int(m[1]) for p in d.iterdir() if (m := _VERSION_DIR.fullmatch(p.name)) and (p / MANIFEST).is_file()}


def versions(home: Path | str, name: str, cached: bool = True) -> list[int]:
    """NAME's versions in this home: built here, and (`cached`) fetched from the bucket into the cache."""
    have = _versions_in(datasets_dir(home), name)
    return sorted(have | _versions_in(cache_dir(home), name) if cached else have)


def parse_ref(home: Path | str, ref: str) -> tuple[str, int]:
    """"NAME@N" -> (NAME, N); a bare "NAME" means its latest version."""
    name, _, ver = ref.partition("@")
    check_name(name)
    have = versions(home, name)
    if not have:
        raise DatasetError(f"no dataset named {name!r} in {datasets_dir(home)} (see `klong dataset list`)")
    if not ver:
        return name, have[-1]
    if not ver.isdigit() or int(ver) not in have:
        raise DatasetError(f"{ref}: no such version of {name} (versions: {', '.join(map(str, have))})")
    return name, int(ver)


def version_dir(home: Path | str, name: str, version: int) -> Path:
    """The version's directory: built here, else its copy in the cache (a local version wins)."""
    local = datasets_dir(home) / name / f"v{version}"
    cached = cache_dir(home) / name / f"v{version}"
    return cached if not (local / MANIFEST).is_file() and (cached / MANIFEST).is_file() else local


def _fetched(home: Path | str, ref: str, archive) -> None:
    """With an archive in a bucket: checks `ref` against the bucket's copy, or fetches it into the cache."""
    from core.objstore import is_s3

    if archive is not None and is_s3(archive):
        from store.datasets_s3 import resolve

        resolve(home, archive, ref)


def load_manifest(home: Path | str, ref: str, archive=None) -> dict:
    """The manifest of `ref`; with `archive` in a bucket, a version only there is fetched first."""
    _fetched(home, ref, archive)
    name, ver = parse_ref(home, ref)
    path = version_dir(home, name, ver) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"{name}@{ver}: manifest {path} is unreadable: {e}") from e


def all_manifests(home: Path | str, cached: bool = True) -> list[dict]:
    """Every version's manifest, by name and version (`cached`: with the versions fetched into the cache)."""
    roots = [datasets_dir(home), *([cache_dir(home)] if cached else [])]
    names = {d.name for root in roots if root.is_dir() for d in root.iterdir() if d.is_dir() and _NAME.fullmatch(d.name)}
    out = []
    for name in sorted(names):
        for v in versions(home, name, cached):
            try:
                out.append(json.loads((version_dir(home, name, v) / MANIFEST).read_text()))
            except (OSError, ValueError):
                continue  # an unreadable manifest shows up in `klong dataset show`, not in a listing
    return out
