"""Dataset versions: immutable, content-hashed Parquet under `HOME/datasets/NAME/v<N>/`, and their reader.

    klong dataset build web-rl --kind rl max_tokens=32768     # -> web-rl@3 (consumers.materialize)
    for s in open_version(home, "web-rl@3"):                  # verifies the content hash first
        s.input_ids, s.loss_mask, s.logprobs, s.advantage     # int32 [n], uint8 [n], float32 [n], float

Layout of one version (written into `datasets/_tmp/` and renamed into place whole; never changed after):

    tokens.parquet   one row per rollout: its steps' tokens ONCE, as flat lists (prefix included)
        rollout_id, group_id, task_id, status, stage, iteration, prefix_len, prefix_tokens,
        step_offsets   list<int64> [n_steps + 1]  step s owns token_ids[step_offsets[s]:step_offsets[s+1]];
                                                  a step no window uses (trailing observations, dropped
                                                  turns, the cut-off head of truncated observations) is empty
        step_assistant list<bool>  [n_steps]
        step_loss_start, step_loss_end  list<int32> [n_steps]  the ids the policy sampled in step s are its
                                                  tokens [start, end): the only ids a loss span trains
                                                  (consumers.sampled; format 1 had no such columns: whole steps)
        step_temperature list<float32> [n_steps]  the temperature step s was sampled at (1.0 unknown)
        token_ids      list<int32> [n_tokens]
        logprobs       list<float32> [n_tokens]   (rl) behaviour logprob per action token, null elsewhere
    samples.parquet  one row per window (sub-trajectory): numbers for SQL plus its spans
        (span_step, span_start, span_end, span_loss: tokens [start, end) of step `span_step`) into the
        rollout's tokens; input = prefix ++ spans, exactly `store.windows.materialize_flat`
    manifest.json    name, version, kind, format, event schema_version, config, tokenizer fingerprint,
                     input set (flush dirs + per-partition offset watermark),
                     counts, drops by reason, pending rollouts, table digests, content hash, created_at

So a dataset grows with unique tokens, not with the number of windows K. Content hash (`content_hash`):
sha256 over a canonical serialization of what the dataset says, never over file bytes, timestamps,
event ids or where the events sat in the archive: the header (format, kind, config, tokenizer
fingerprint, counts, drops, pending rollouts) as sorted-key JSON, then a digest of `tokens` (per rollout,
sorted by rollout_id) and of `samples` (sorted by rollout_id, window_idx), each column serialized as
little-endian values + lengths + null flags. A rebuild from the same events gives the same hash.

SQL views `datasets` (one row per version) and `samples` (one row per window of every version):
store.dataset_views.

With an archive in a bucket, versions are published there too, and a version only there is fetched into
`HOME/datasets/_cache/NAME/v<N>/` (store.datasets_s3); `versions`, `version_dir` and `all_manifests` find
cached versions beside local ones (a local one wins), and `load_manifest`/`open_version` with `archive`
fetch first.

The parts: store.dataset_layout (names, schemas, places, manifests), store.dataset_hash (the content hash),
store.dataset_write (build directory, writers, publish), store.dataset_read (DatasetVersion, open_version).
This module re-exports them under the names the rest of the system uses (`from store import datasets as ds`).
"""

from store.dataset_hash import (HASHED, canonical_json, combine_row_digests, content_hash, samples_digest,
                                stored_digests, table_digest, tokens_row_digests)
from store.dataset_layout import (_NAME, _VERSION_DIR, DATASETS, FORMAT, MANIFEST, ROW_GROUP_TOKENS, SAMPLES,
                                  SAMPLES_SCHEMA, TOKENS, TOKENS_SCHEMA, DatasetError, _fetched, all_manifests,
                                  cache_dir, check_name, datasets_dir, load_manifest, parse_ref, version_dir,
                                  versions)
from store.dataset_read import DatasetVersion, Sample, open_version
from store.dataset_write import TokensWriter, discard, new_build_dir, publish, report_progress, write_samples

__all__ = [
    "DATASETS", "FORMAT", "HASHED", "MANIFEST", "ROW_GROUP_TOKENS", "SAMPLES", "SAMPLES_SCHEMA", "TOKENS",
    "TOKENS_SCHEMA", "DatasetError", "DatasetVersion", "Sample", "TokensWriter", "_NAME", "_VERSION_DIR", "_fetched",
    "all_manifests", "cache_dir", "canonical_json", "check_name", "combine_row_digests", "content_hash",
    "datasets_dir", "discard", "load_manifest", "new_build_dir", "open_version", "parse_ref", "publish",
    "report_progress", "samples_digest", "stored_digests", "table_digest", "tokens_row_digests",
    "version_dir", "versions", "write_samples",
]
