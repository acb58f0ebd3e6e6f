"""Imports run only downward: every library module imports only its own package or lower layers.

The layers, bottom to top (README, "Layout"): schemas < core < services < store < producers < consumers <
trainer < rl < ui < klong. Every import statement counts, at module level or inside a function, since a
function-level import is the same dependency paid later. The old paths of moved modules (core.aliases)
still import for users, but the library itself must not use them.

    KLONG_LAYERS_ROOT=/other/checkout pytest tests/test_layers.py   # check another tree (e.g. before the move)
"""

from __future__ import annotations

import ast
import importlib
import os
import re
from pathlib import Path

import pytest

from core.aliases import MOVED, new_name, rewrite

LAYERS = ["schemas", "core", "services", "store", "producers", "consumers", "trainer", "rl", "ui", "klong"]
RANK = {name: i for i, name in enumerate(LAYERS)}
ROOT = Path(os.environ.get("KLONG_LAYERS_ROOT") or Path(__file__).resolve().parents[1])


def _imports(tree: ast.AST, package: str):
    """(line, absolute module name) of every import in a module, nested ones included."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: within the package, the same layer
                base = f"{package}.{base}" if base else package
            if "." in base:
                yield node.lineno, base
            else:  # `from store import viewer` imports the module store.viewer
                for alias in node.names:
                    yield node.lineno, f"{base}.{alias.name}"


def violations(root: Path) -> list[str]:
    found = []
    for layer in LAYERS:
        for path in sorted((root / layer).rglob("*.py")):
            rel = path.relative_to(root)
            for line, name in _imports(ast.parse(path.read_text(), str(rel)), layer):
                top = name.split(".")[0]
                if top not in RANK:
                    continue  # the standard library or a third-party package
                if RANK[top] > RANK[layer]:
                    found.append(f"{rel}:{line}: {layer} imports {name} from {top}, a higher layer")
                elif new_name(name) is not None:
                    old = next(o for o in MOVED if name == o or name.startswith(o + "."))
                    found.append(f"{rel}:{line}: imports {old}, the old path of {MOVED[old]}")
            if rel.as_posix() != "core/aliases.py":
                found += _old_paths_in_strings(path, rel)
    return sorted(set(found))


def _old_paths_in_strings(path: Path, rel: Path) -> list[str]:
    """A module path in a string is an import too (a worker extension class, a list of view modules)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _DOTTED.fullmatch(node.value):
            old = next((o for o in MOVED if node.value == o or node.value.startswith(o + ".")), None)
            if old:
                found.append(f"{rel}:{node.lineno}: names {node.value!r}, the old path of {MOVED[old]}")
    return found


_DOTTED = re.compile(r"[a-z_]+(\.[A-Za-z_][A-Za-z0-9_]*)+")


def test_imports_run_only_downward():
    assert (ROOT / "schemas").is_dir(), f"{ROOT} is not a KLong checkout"
    bad = violations(ROOT)
    assert not bad, f"{len(bad)} imports go up the layers ({' < '.join(LAYERS)}):\n" + "\n".join(bad)


def test_every_library_package_has_a_layer():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    missing = sorted(packages - set(LAYERS))
    assert not missing, f"packages without a layer in tests/test_layers.py: {missing}"


def test_the_check_sees_function_level_and_relative_imports(tmp_path):
    for layer in LAYERS:
        (tmp_path / layer).mkdir()
    (tmp_path / "store" / "bad.py").write_text(
        "import os\nfrom store import catalog\n\ndef f():\n    from consumers.sink import Sink\n"
        "    import trainer.data\n    from .views import x\n    from klong import settings\n")
    assert violations(tmp_path) == [
        "store/bad.py:5: store imports consumers.sink from consumers, a higher layer",
        "store/bad.py:6: store imports trainer.data from trainer, a higher layer",
        "store/bad.py:8: store imports klong.settings from klong, a higher layer",
    ]
    (tmp_path / "klong" / "old.py").write_text("from store.viewer import NotFound\nimport klong.settings\n"
                                               "EXT = 'klong.serve_worker.PolicyWorkerExtension'\n")
    assert violations(tmp_path)[:3] == [
        "klong/old.py:1: imports store.viewer, the old path of ui.viewer",
        "klong/old.py:2: imports klong.settings, the old path of core.settings",
        "klong/old.py:3: names 'klong.serve_worker.PolicyWorkerExtension', the old path of services.serve_worker",
    ]


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_paths_are_the_same_modules(old):
    assert importlib.import_module(old) is importlib.import_module(MOVED[old])


def test_patching_an_old_path_patches_the_module(monkeypatch):
    import core.settings
    import ui.app
    from store.ui import app

    monkeypatch.setattr("klong.settings.HOME_ENTRIES", ("patched",))
    assert core.settings.HOME_ENTRIES == ("patched",)
    assert app is ui.app and ui.app.__spec__.name == "ui.app"  # the real spec survives the alias
    assert importlib.import_module("store.ui.finder") is importlib.import_module("ui.finder")


@pytest.mark.parametrize("old, new", [
    ("from klong.settings import Settings", "from core.settings import Settings"),
    ("from klong import serve", "from services import serve"),
    ("from producers import rl_start", "from rl import start as rl_start"),
    ("    from store import viewer as v  # late", "    from ui import viewer as v  # late"),
    ("from store import ui", "import ui"),
    ("import klong.serve_worker", "import services.serve_worker"),
    ("EXT = 'klong.serve_worker.PolicyWorkerExtension'", "EXT = 'services.serve_worker.PolicyWorkerExtension'"),
    ("see store/ui/app.py, klong/settings.py", "see ui/app.py, core/settings.py"),
    ("producers.scheduler_services, producers.scheduler.Scheduler", "rl.services, rl.scheduler.Scheduler"),
    ("from store import datasets as ds", "from store import datasets as ds"),  # not moved
    ("restore.ui klong.settings_x my.store.viewer", "restore.ui klong.settings_x my.store.viewer"),  # other names
])
def test_rewrite_makes_old_paths_new(old, new):
    assert rewrite(old) == new


def test_rewrite_command_on_files(tmp_path):
    import subprocess
    import sys

    f = tmp_path / "mine.py"
    f.write_text("from klong.settings import Settings\nfrom store.viewer import NotFound\n")
    out = subprocess.run([sys.executable, "-m", "core.aliases", str(f)], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert f.read_text() == "from core.settings import Settings\nfrom ui.viewer import NotFound\n"
    assert violations_of_text(f.read_text()) == []
    here = Path(__file__).read_text()  # names core.aliases: its old paths are meant, so it is left alone
    subprocess.run([sys.executable, "-m", "core.aliases", __file__], check=True, timeout=120,
                   cwd=Path(__file__).resolve().parents[1], capture_output=True)
    assert Path(__file__).read_text() == here


def violations_of_text(text: str) -> list[str]:
    """Old paths left in one module's text (what `python -m core.aliases` must leave none of)."""
    return [name for _, name in _imports(ast.parse(text), "klong") if new_name(name) is not None]
