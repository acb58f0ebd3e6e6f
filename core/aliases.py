"""The old import paths of moved modules, kept working for one release (deprecated).

    import klong.settings          # the very module object core.settings: patching one patches the other
    from store.ui import app       # ui.app
    python -m core.aliases FILE... # rewrites the old paths in your files (imports, strings, docs) to the new

`install()` (called by the `klong`, `store`, `producers` and `consumers` packages, so an old path works the
moment its parent package is imported) puts one finder in front of `sys.meta_path`: a name in `MOVED`, or
below a moved package (`store.ui.app`), is answered with the module at its new path, imported once, so the
old name and the new one are the same object. New code imports the new paths; `tests/test_layers.py`
checks that the library itself never uses an old one.

Why a finder and no file left at each old path: the old files are gone, so `git merge` follows every rename
and edits made elsewhere to `store/viewer.py` land in `ui/viewer.py` instead of conflicting with a stub.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import re
import sys
from pathlib import Path
from typing import Optional

MOVED = {  # old path -> new path; a package's submodules follow it
    "klong.settings": "core.settings",
    "klong.procs": "core.procs",
    "store.objstore": "core.objstore",
    "consumers.chat": "core.chat",
    "consumers.tokenize": "core.tokenize",
    "klong.broker": "services.broker",
    "klong.serve": "services.serve",
    "klong.serve_worker": "services.serve_worker",
    "consumers.flush": "store.flush",
    "store.replay": "consumers.replay",
    "store.ui": "ui",
    "store.report": "ui.report",
    "store.viewer": "ui.viewer",
    "store.overlay": "ui.overlay",
    "producers.scheduler": "rl.scheduler",
    "producers.rl_loop": "rl.loop",
    "producers.rl_plan": "rl.plan",
    "producers.rl_eval": "rl.evals",
    "producers.rl_start": "rl.start",
    "producers.iteration": "rl.iteration",
    "producers.scheduler_services": "rl.services",
    "producers.train_hook": "rl.train_hook",
}


def new_name(name: str) -> Optional[str]:
    """The current path of a module imported by an old one (None: not moved)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        old = ".".join(parts[:i])
        if old in MOVED:
            return ".".join([MOVED[old], *parts[i:]])
    return None


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers an old module path with the module imported from its new path."""

    def find_spec(self, name, path=None, target=None):
        if new_name(name) is None:
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):
        module = importlib.import_module(new_name(spec.name))
        spec.loader_state = module.__spec__  # the import system sets __spec__ to the alias spec: put it back
        return module

    def exec_module(self, module) -> None:
        spec = module.__spec__
        if spec is not None and spec.loader is self:
            module.__spec__ = spec.loader_state


_FINDER = _OldPaths()


def install() -> None:
    """Makes the old paths importable (idempotent)."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


_OLD = sorted(MOVED, key=len, reverse=True)  # longest first: producers.scheduler_services before producers.scheduler
_NAME = re.compile(r"(?<![\w./])(" + "|".join(re.escape(o) for o in _OLD) + r")(?!\w)")
_PATH = re.compile(r"(?<![\w./])(" + "|".join(re.escape(o.replace(".", "/")) for o in _OLD) + r")(\.py|/)")
_FROM = re.compile(r"^(\s*)from (\w+) import (\w+)(?: as (\w+))?[ \t]*(#.*)?$", re.M)


def _from_line(m: re.Match) -> str:
    """`from klong import serve` -> `from services import serve`; `from producers import rl_start` ->
    `from rl import start as rl_start`: the name the code uses stays."""
    indent, parent, leaf, alias, comment = m.groups()
    new = MOVED.get(f"{parent}.{leaf}")
    if new is None:
        return m.group(0)
    package, _, new_leaf = new.rpartition(".")
    name = alias or leaf
    line = (f"import {new_leaf}" if not package else f"from {package} import {new_leaf}") + \
        (f" as {name}" if name != new_leaf else "")
    return indent + line + (f"  {comment}" if comment else "")


def rewrite(text: str) -> str:
    """`text` with every old module path (dotted, as a file path, or `from PARENT import MODULE`) made new."""
    text = _FROM.sub(_from_line, text)
    text = _PATH.sub(lambda m: MOVED[m.group(1).replace("/", ".")].replace(".", "/") + m.group(2), text)
    return _NAME.sub(lambda m: MOVED[m.group(1)], text)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m core.aliases FILE...  rewrites the old module paths in each file to the new ones\n"
              "(a file that names core.aliases, such as this one, is left as it is)")
        return 0 if argv else 2
    for name in argv:
        path = Path(name)
        text = path.read_text()
        if "core.aliases" in text or "core/aliases" in text:  # a file about the old paths names them on purpose
            print(f"left {path}: it names core.aliases")
            continue
        new = rewrite(text)
        if new != text:
            path.write_text(new)
            print(f"rewrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
