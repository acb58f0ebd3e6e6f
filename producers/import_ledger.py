"""Which file and line each imported rollout id came from, kept in the data home before anything is sent.

    ledger = Ledger(settings.home)                       # HOME/imports/ledger.jsonl
    ledger.conflict(rollout_id, row_hash)                # -> "teacher.jsonl line 3" (same id, other content) or None
    ledger.record(path, [(line, rollout_id, row_hash)])  # appended and fsynced before the rows are sent

A row's rollout id comes from its `id` (and task), so two files whose rows share an id would land in one
rollout. The archive tells an earlier import only once a sink has archived it; the ledger tells at once,
so a collision is refused (naming the earlier file and line) before anything is sent, even when the first
import's events are still in Kafka. One JSON object per line; a torn last line (a crash while writing) is
ignored, and the rows it named are recorded again by the next import.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional


class Ledger:
    def __init__(self, home: Path | str):
        self.path = Path(home) / "imports" / "ledger.jsonl"
        self.seen: dict[str, tuple[str, str, int]] = {}  # rollout_id -> (row_hash, file, line)
        if self.path.is_file():
            for raw in self.path.read_bytes().splitlines():
                try:
                    e = json.loads(raw)
                    self.seen.setdefault(e["rollout_id"], (e["row_hash"], e["file"], int(e["line"])))
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line

    def conflict(self, rollout_id: str, row_hash: str) -> Optional[str]:
        """Where this rollout id was imported from with other content ("FILE line N"), else None."""
        known = self.seen.get(rollout_id)
        if known is None or known[0] == row_hash:
            return None
        return f"{known[1]} line {known[2]}"

    def record(self, path: Path | str, rows: Iterable[tuple[int, str, str]]) -> None:
        """Appends (line, rollout_id, row_hash) of the rows about to be sent, fsynced."""
        new = [(line, rid, h) for line, rid, h in rows if rid not in self.seen]
        if not new:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        name = str(Path(path).resolve())
        with open(self.path, "a", encoding="utf-8") as f:
            for line, rid, h in new:
                f.write(json.dumps({"rollout_id": rid, "row_hash": h, "file": name, "line": line}) + "\n")
                self.seen[rid] = (h, name, line)
            f.flush()
            os.fsync(f.fileno())
