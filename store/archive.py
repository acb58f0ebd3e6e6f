"""The event archive: Parquet files named by the Kafka offsets they hold (the Kafka Connect HDFS pattern).

Layout under the data home:

    archive/<topic>/<topic_id>/<topic>+<partition>+<first offset>+<last offset>/<event_type>.parquet
                                                                               /dead_letters.parquet
                                                                               /manifest.json

One directory per flush of one partition, written under `archive/_tmp/`, fsync'd and renamed into
place: a flush is in the archive whole or not at all. Its `manifest.json` is the commit record: the
files of the flush with their row counts, sizes and CRC-32, how many Kafka records it holds, and the
offset it follows (`after`: the last offset the sink had read before this flush; null when the sink read
the partition from its beginning), so a lost file or a lost flush shows as a broken chain
(store.integrity). `klong archive repair` moves a damaged flush to `archive/_quarantine/`. The archive,
not Kafka's committed offset, is the truth: at start the sink resumes each partition after the highest
last offset in the names. `topic_id` is the topic's incarnation (a memory broker that restarts recreates
its topics with new ids and offsets from 0 again), so offsets of different incarnations never collide.

Readers see only what the layout and the manifests name: anything else (a stray file, a symlink, a
Parquet file a manifest does not list) is skipped with one warning per path and never followed, so a
`README.txt` or a symlink to /etc dropped into the archive cannot fail or redirect a query. Flushes
written before manifests existed are read by their `<event_type>.parquet` files.

The archive can also be an S3 prefix (`KLONG_ARCHIVE_URL`, core.objstore): the same keys, and the
manifest object, written last, is the commit point there (store.archive_s3); these functions dispatch.
The parts: store.archive_layout (names, FlushDir, manifests), store.archive_walk (walk, list_flushes,
recover_positions), store.archive_write (write_flush, writer_lock, clean_tmp); this module re-exports them.
"""

from store.archive_layout import (_NAME, DATASETS, DEAD_LETTER_SCHEMA, DEAD_LETTERS, LOCK, LOW_CARDINALITY, MANIFEST,
                                  QUARANTINE, TABLES, TMP, FlushDir, Stray, file_entry, flush_name, make_manifest,
                                  parse_manifest, read_manifest)
from store.archive_walk import _warn, archived_files, list_flushes, recover_positions, relative, walk
from store.archive_write import clean_tmp, write_flush, writer_lock

__all__ = ["DATASETS", "DEAD_LETTERS", "DEAD_LETTER_SCHEMA", "LOCK", "LOW_CARDINALITY", "MANIFEST", "QUARANTINE",
           "TABLES", "TMP", "FlushDir", "Stray", "_NAME", "_warn", "archived_files", "clean_tmp", "file_entry",
           "flush_name", "list_flushes", "make_manifest", "parse_manifest", "read_manifest", "recover_positions",
           "relative", "walk", "write_flush", "writer_lock"]
