"""Where things are: the data home, the Kafka connection, the topic names.

Every command takes `--home DIR` (or `KLONG_HOME`, default `./klong-data`) and `--bootstrap-servers`
(or `KLONG_BOOTSTRAP_SERVERS`; default: the embedded broker started with `klong broker start` in the
same home). Security settings for a real cluster come from the environment and are passed through
to kafka-python; secrets are never printed: `Settings.describe()` masks them, the password is a
`Secret` (its repr is `'***'`, so a client's config dump at DEBUG level shows no password), and the
CLI's log handlers carry a `RedactingFilter` that masks secret values and secret-looking key=value
pairs in every log line:

    KLONG_KAFKA_SECURITY_PROTOCOL   PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL
    KLONG_KAFKA_SASL_MECHANISM      PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512
    KLONG_KAFKA_SASL_USERNAME / KLONG_KAFKA_SASL_PASSWORD
    KLONG_KAFKA_SSL_CAFILE / KLONG_KAFKA_SSL_CERTFILE / KLONG_KAFKA_SSL_KEYFILE

`KLONG_TOPIC_PREFIX` (default `klong`) names the topics, so several deployments (or tests) can
share one cluster. `KLONG_ARCHIVE_URL=s3://bucket/prefix` puts the archive in a bucket (core.objstore;
endpoint and credentials from the usual AWS variables); the default is `<home>/archive`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from schemas.errors import ConfigError
from schemas.events import event_type

DEFAULT_PORT = 9092
_SECURITY_ENV = {
    "KLONG_KAFKA_SECURITY_PROTOCOL": "security_protocol",
    "KLONG_KAFKA_SASL_MECHANISM": "sasl_mechanism",
    "KLONG_KAFKA_SASL_USERNAME": "sasl_plain_username",
    "KLONG_KAFKA_SASL_PASSWORD": "sasl_plain_password",
    "KLONG_KAFKA_SSL_CAFILE": "ssl_cafile",
    "KLONG_KAFKA_SSL_CERTFILE": "ssl_certfile",
    "KLONG_KAFKA_SSL_KEYFILE": "ssl_keyfile",
}
_SECRET = {"sasl_plain_password"}
# What a data home holds once any command wrote to it (Settings.require_home).
HOME_ENTRIES = ("archive", "broker.json", "outbox", "blobs", "datasets", "judge", "rollouts", "runs", "models", "tasks")
# Environment variables whose values are secrets wherever they turn up (logs): the named ones, and any
# variable whose name says so.
_SECRET_ENV = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_KEY|APIKEY|CREDENTIAL)", re.I)
# key=value / "key": "value" pairs whose key says secret, in any logged text (a client's config dump).
_SECRET_PAIR = re.compile(r"""(?P<key>['"]?[\w.-]*(?:password|passwd|secret|token|api_key|apikey)[\w.-]*['"]?\s*[:=]\s*)"""
                          r"""(?P<q>['"]?)(?P<value>[^'",\s}]+)(?P=q)""", re.I)


class Secret(str):
    """A secret string: its value for whoever uses it, `'***'` in every repr (a dict of client settings
    printed by a library at DEBUG level, a dataclass in a traceback)."""

    def __repr__(self) -> str:
        return "'***'"


def redact(text: str, secrets: list[str] | None = None) -> str:
    """`text` with every secret value (from the environment, or `secrets`) and every secret-looking
    key=value pair masked."""
    values = secrets if secrets is not None else _secret_values()
    for v in values:
        text = text.replace(v, "***")
    return _SECRET_PAIR.sub(lambda m: m["key"] + m["q"] + "***" + m["q"], text)


def _secret_values() -> list[str]:
    vals = {v for k, v in os.environ.items() if (_SECRET_ENV.search(k) or k in _SECURITY_ENV and
                                                  _SECURITY_ENV[k] in _SECRET) and len(v) >= 4}
    return sorted(vals, key=len, reverse=True)


class RedactingFilter(logging.Filter):
    """A logging filter (put it on handlers) that masks secrets in every record's final message."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is logging's business, not ours
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Adds a RedactingFilter to every handler of `logger` (default: the root logger)."""
    for h in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in h.filters):
            h.addFilter(RedactingFilter())


_TOPIC_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")  # Kafka's topic characters; it names archive dirs


@dataclass(frozen=True)
class Topics:
    prefix: str = "klong"

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, str) or not _TOPIC_PREFIX.fullmatch(self.prefix):
            raise ConfigError(f"topic prefix {self.prefix!r} is not valid: use letters, digits, '.', '_' and '-' "
                              "(it names Kafka topics and archive directories)")

    @property
    def rollouts(self) -> str:
        return f"{self.prefix}.rollouts"

    @property
    def judge_eval(self) -> str:
        return f"{self.prefix}.judge.requests.eval"

    @property
    def judge_train(self) -> str:
        return f"{self.prefix}.judge.requests.train"

    @property
    def judge_results(self) -> str:
        return f"{self.prefix}.judge.results"

    @property
    def tasks(self) -> str:
        return f"{self.prefix}.tasks"

    @property
    def training(self) -> str:
        return f"{self.prefix}.training"

    @property
    def sink_group(self) -> str:
        """Consumer group of the archive sink: its committed offsets say what is archived."""
        return f"{self.prefix}.sink"

    @property
    def rollout_requests(self) -> str:
        """Rollout fleet (producers.fleet): requests the scheduler publishes, consumed by the worker group."""
        return f"{self.prefix}.rollout.requests"

    @property
    def rollout_results(self) -> str:
        return f"{self.prefix}.rollout.results"

    @property
    def rollout_control(self) -> str:
        return f"{self.prefix}.rollout.control"

    @property
    def fleet_group(self) -> str:
        """Consumer group of the rollout workers (`klong rollout worker`)."""
        return f"{self.prefix}.rollout.workers"

    def fleet(self) -> list[str]:
        """The fleet's topics: messages, not events, so the archive sink (all()) never reads them."""
        return [self.rollout_requests, self.rollout_results, self.rollout_control]

    def all(self) -> list[str]:
        return [self.rollouts, self.judge_eval, self.judge_train, self.judge_results, self.tasks, self.training]

    def for_event(self, ev) -> str:
        """The topic an event goes to: judge requests split by priority so eval never waits behind train."""
        etype = event_type(ev)
        if etype == "judge_requested":
            return self.judge_eval if ev.payload.priority == "eval" else self.judge_train
        return {
            "task_registered": self.tasks,
            "judge_result": self.judge_results,
            "training_run": self.training,
            "rl_iteration": self.training,
        }.get(etype, self.rollouts)


@dataclass(frozen=True)
class Settings:
    home: Path
    bootstrap_servers: str | None = None  # None: the embedded broker of this home
    topics: Topics = field(default_factory=Topics)
    partitions: int = 4
    security: dict = field(default_factory=dict)
    archive_url: str | None = None  # s3://bucket/prefix (KLONG_ARCHIVE_URL); None: <home>/archive

    @classmethod
    def load(cls, home: str | os.PathLike | None = None, bootstrap_servers: str | None = None,
             topic_prefix: str | None = None, partitions: int | None = None) -> "Settings":
        home_path = Path(home or os.environ.get("KLONG_HOME") or "klong-data").resolve()
        security = {kw: Secret(os.environ[env]) if kw in _SECRET else os.environ[env]
                    for env, kw in _SECURITY_ENV.items() if os.environ.get(env)}
        parts = partitions or int(os.environ.get("KLONG_PARTITIONS", "4"))
        if parts < 1:
            raise ConfigError(f"partitions must be >= 1, got {parts}")
        return cls(
            home=home_path,
            bootstrap_servers=bootstrap_servers or os.environ.get("KLONG_BOOTSTRAP_SERVERS") or None,
            topics=Topics(topic_prefix or os.environ.get("KLONG_TOPIC_PREFIX") or "klong"),
            partitions=parts,
            security=security,
            archive_url=os.environ.get("KLONG_ARCHIVE_URL") or None,
        )

    def require_home(self) -> None:
        """ConfigError unless `home` looks like a data home: a directory that is empty (new) or holds
        something KLong writes. A mistyped --home must not show an empty world."""
        h = self.home
        if not h.is_dir():
            raise ConfigError(f"no data home at {h} (mistyped --home / KLONG_HOME? `klong broker start` or "
                              "`klong sink run` creates one)")
        # with the archive in a bucket a home may hold nothing of KLong's but scratch space (tmp/)
        if not self.archive_url and any(h.iterdir()) and not any((h / n).exists() for n in HOME_ENTRIES):
            raise ConfigError(f"{h} is not a KLong data home (none of {', '.join(HOME_ENTRIES)} in it): "
                              "mistyped --home / KLONG_HOME?")

    @property
    def archive_dir(self) -> Path:
        return self.home / "archive"

    @property
    def archive(self):
        """Where the archive is: `archive_dir` (a Path), or an S3 prefix (core.objstore.S3Location)."""
        if not self.archive_url:
            return self.archive_dir
        from core.objstore import location

        return location(self.archive_url)

    @property
    def blob_dir(self) -> Path:
        return self.home / "blobs"

    @property
    def outbox_dir(self) -> Path:
        return self.home / "outbox"

    @property
    def broker_file(self) -> Path:
        return self.home / "broker.json"

    def bootstrap(self) -> str:
        """The servers to connect to: explicit setting, else the embedded broker of this home."""
        if self.bootstrap_servers:
            return self.bootstrap_servers
        if self.broker_file.exists():
            info = json.loads(self.broker_file.read_text())
            return f"127.0.0.1:{info['port']}"
        raise ConfigError(
            f"no Kafka to talk to: no embedded broker in {self.home} (run `klong broker start`) "
            "and no --bootstrap-servers / KLONG_BOOTSTRAP_SERVERS"
        )

    def kafka_config(self) -> dict:
        """Keyword arguments common to every kafka-python client."""
        return {"bootstrap_servers": self.bootstrap().split(","), **self.security}

    def describe(self) -> dict:
        """Settings as a dict safe to print: secrets masked."""
        try:
            bootstrap = self.bootstrap()
        except ConfigError:
            bootstrap = None
        return {
            "home": str(self.home),
            "bootstrap_servers": bootstrap,
            "topic_prefix": self.topics.prefix,
            "partitions": self.partitions,
            "archive": self.archive_url or str(self.archive_dir),
            "security": {k: ("***" if k in _SECRET else v) for k, v in self.security.items()},
        }


def read_yaml(path: str | os.PathLike) -> dict:
    """A YAML config file as a dict; ConfigError naming the file when it is missing, invalid or not a mapping."""
    import yaml

    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config {path} is not UTF-8 text (byte {e.start}: {e.reason})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path} is not valid YAML: {e}") from e
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"--config {path} must hold a mapping of key: value, not {type(loaded).__name__}")
    return loaded or {}
