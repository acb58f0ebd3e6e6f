"""Store: the archive (Parquet flushes), its SQL catalog (DuckDB), dataset versions and their checks."""

from core import aliases as _aliases

_aliases.install()  # store.ui, store.viewer, store.objstore, ... still import (deprecated; see core.aliases)
