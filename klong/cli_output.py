"""Command output: progress bars on stderr and query results as a table, CSV, JSON, NDJSON or Parquet.

    _print_table(arrow_table, "csv", None)       # to stdout; with an output path, to that file
    bar = _progress("archiving", unit="ev", quiet=args.quiet)   # tqdm, only on a terminal and without -q

Cells of the plain table are cut at 60 characters; CSV lines end in \\n so shell substitutions compare equal.
"""

from __future__ import annotations

import json
import sys

from schemas.errors import KlongError


def _progress(desc: str, unit: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(desc=desc, unit=unit, disable=quiet or not sys.stderr.isatty(), file=sys.stderr)


class StageBars:
    """Progress bars for a command with stages: `bars(stage, count)` moves the bar of `stage` to `count`,
    closing the previous stage's bar (on stderr, only on a terminal and without -q)."""

    def __init__(self, units: dict[str, str], quiet: bool):
        self.units, self.quiet = units, quiet
        self.stage, self.bar = None, None

    def __call__(self, stage: str, count: int) -> None:
        if stage != self.stage:
            self.close()
            self.stage, self.bar = stage, _progress(stage, unit=self.units.get(stage, "it"), quiet=self.quiet)
        self.bar.update(count - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.stage, self.bar = None, None


def _print_table(table, fmt: str, output: str | None) -> None:
    import pyarrow.parquet as pq

    if fmt == "parquet":
        if not output:
            raise KlongError("--format parquet needs --output FILE")
        pq.write_table(table, output)
        print(f"wrote {table.num_rows} rows to {output}")
        return
    rows = table.to_pylist()
    out = open(output, "w") if output else sys.stdout
    try:
        if fmt == "json":  # one JSON array
            out.write("[" + ",\n".join(json.dumps(r, default=_json_default) for r in rows) + "]\n")
        elif fmt == "ndjson":  # one JSON object per line
            for r in rows:
                out.write(json.dumps(r, default=_json_default) + "\n")
        elif fmt == "csv":
            import csv

            w = csv.writer(out, lineterminator="\n")  # not csv's \r\n: `$(klong sql ... --format csv)` must match
            w.writerow(table.column_names)
            for r in rows:
                w.writerow([_cell(v) for v in r.values()])
        else:
            _ascii_table(table.column_names, [[_cell(v, 60) for v in r.values()] for r in rows], out)
    finally:
        if output:
            out.close()


def _json_default(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", "backslashreplace")
    return str(v)


def _cell(v, width: int | None = None) -> str:
    if v is None:
        text = ""
    elif isinstance(v, float):
        text = f"{v:.6g}"
    elif isinstance(v, (list, dict)):
        text = json.dumps(v, default=_json_default)
    elif isinstance(v, bytes):
        text = _json_default(v)
    else:
        text = str(v)
    text = text.replace("\n", "\\n")
    return text if width is None or len(text) <= width else text[: width - 1] + "…"


def _ascii_table(names: list[str], rows: list[list[str]], out) -> None:
    widths = [max([len(n)] + [len(r[i]) for r in rows]) for i, n in enumerate(names)]
    out.write(" | ".join(n.ljust(w) for n, w in zip(names, widths)) + "\n")
    out.write("-+-".join("-" * w for w in widths) + "\n")
    for r in rows:
        out.write(" | ".join(c.ljust(w) for c, w in zip(r, widths)) + "\n")
    out.write(f"({len(rows)} row{'s' if len(rows) != 1 else ''})\n")
