"""A throwaway data home for the real-model benches (bench/loop.py, bench/learn.py).

    with real_model_home("klong-bench-loop-", args.model, args.keep) as (settings, broker, model):
        ...   # an embedded broker with the topics, SmolLM2 imported into the home unless `model` is given

On the way out the home's policy server (if one runs) and the broker stop, and the whole temporary directory
(models, checkpoints, archive: several GB a run) goes unless `keep`, in which case its path is printed.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

from core.settings import Settings
from klong.demo import smollm2_gguf
from services import serve
from services.broker import BrokerProcess, ensure_topics, free_port
from trainer.model_import import import_model


@contextlib.contextmanager
def real_model_home(prefix: str, model_dir: Optional[str], keep: bool) -> Iterator[tuple[Settings, BrokerProcess, Path]]:
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    home = tmp / "home"
    broker = BrokerProcess.start(free_port(), tmp / "broker.log")
    settings = Settings(home=home, bootstrap_servers=broker.bootstrap)
    home.mkdir(parents=True)
    try:
        ensure_topics(settings)
        model = Path(model_dir) if model_dir else import_model(smollm2_gguf(), "smollm2", home / "models")
        yield settings, broker, model
    finally:
        server = serve.PolicyServer.from_home(home)
        if server is not None:
            server.stop()
        broker.stop()
        if keep:
            print(f"bench home kept: {home}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
