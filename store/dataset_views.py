"""SQL views of the dataset versions (store.datasets), created on every catalog connection that names them.

    klong sql "SELECT dataset, version, n_samples, n_tokens, content_hash FROM datasets"
    klong sql "SELECT dataset, version, rollout_id, window_idx, n_tokens, advantage FROM samples WHERE version = 3"

- `datasets`: one row per version, from the manifests (`DATASETS_VIEW_SCHEMA`).
- `samples`: one row per window of every version: `dataset`, `version`, then the samples.parquet columns
  without the span lists (`SAMPLES_VIEW_COLUMNS`). Versions written before a column existed (say
  `prefix_same_ctx`) give NULL in it: the files are read by column name (`store.catalog.parquet_source`).
Both exist, empty and with every column, when there is no dataset.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow as pa

from store.catalog import parquet_source
from store.datasets import SAMPLES, SAMPLES_SCHEMA, all_manifests, version_dir

SAMPLES_VIEW_COLUMNS = [f.name for f in SAMPLES_SCHEMA if not f.name.startswith("span_")]
DATASETS_VIEW_SCHEMA = pa.schema([
    ("dataset", pa.string()), ("version", pa.int64()), ("ref", pa.string()), ("kind", pa.string()),
    ("content_hash", pa.string()), ("created_at", pa.timestamp("us", tz="UTC")), ("n_samples", pa.int64()),
    ("n_rollouts", pa.int64()), ("n_tokens", pa.int64()), ("n_loss_tokens", pa.int64()), ("n_pending", pa.int64()),
    ("n_dropped", pa.int64()), ("n_input_flushes", pa.int64()), ("config", pa.string()), ("drops", pa.string()),
    ("path", pa.string()),
])
_SAMPLE_FILES_SCHEMA = pa.schema([("dataset", pa.string()), ("version", pa.int64()), ("filename", pa.string())])


def datasets_table(home: Path) -> pa.Table:
    """One row per dataset version with a readable manifest (DATASETS_VIEW_SCHEMA)."""
    rows = []
    for m in all_manifests(home):
        c = m["counts"]
        rows.append({
            "dataset": m["name"], "version": m["version"], "ref": m["ref"], "kind": m["kind"],
            "content_hash": m["content_hash"], "created_at": dt.datetime.fromisoformat(m["created_at"]),
            "n_samples": c["samples"], "n_rollouts": c["rollouts"], "n_tokens": c["tokens"],
            "n_loss_tokens": c["loss_tokens"], "n_pending": len(m["pending"]),
            "n_dropped": sum(d["count"] for d in m["drops"].values()), "n_input_flushes": len(m["input"]["flushes"]),
            "config": json.dumps(m["config"], sort_keys=True), "drops": json.dumps(m["drops"], sort_keys=True),
            "path": str(version_dir(home, m["name"], m["version"])),
        })
    return pa.Table.from_pylist(rows, schema=DATASETS_VIEW_SCHEMA)


VIEW_NAMES = ("datasets", "samples")  # what register_views creates (the catalog skips it for queries naming neither)


def register_views(con, settings) -> None:
    """Creates the `datasets` and `samples` views on a catalog connection.

    `samples` reads every version's samples.parquet (one explicit file list) and joins each row to its
    version through the file name."""
    table = datasets_table(Path(settings.home))
    con.register("_datasets", table)
    con.execute("CREATE VIEW datasets AS SELECT * FROM _datasets")
    files = pa.table({"dataset": table.column("dataset"), "version": table.column("version"),
                      "filename": [str(Path(p) / SAMPLES) for p in table.column("path").to_pylist()]},
                     schema=_SAMPLE_FILES_SCHEMA)
    con.register("_sample_files", files)
    source = parquet_source(con, "samples", files.column("filename").to_pylist(),
                            SAMPLES_SCHEMA.append(pa.field("filename", pa.string())), "filename=true")
    cols = ", ".join(f"s.{c}" for c in SAMPLES_VIEW_COLUMNS)
    con.execute(f"CREATE VIEW samples AS SELECT f.dataset, f.version, {cols} "
                f"FROM {source} s JOIN _sample_files f USING (filename)")
