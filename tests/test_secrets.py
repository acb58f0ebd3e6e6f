"""Secrets never reach a log line: the real `klong` commands at `-v` (kafka-python dumps its whole client
configuration at DEBUG level) with a SASL password and an API key in the environment, output scanned."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from core.settings import RedactingFilter, Settings, redact
from tests.test_cli import klong
from tests.test_tasks import make_task

PASSWORD = "pw-9f3a-never-print-me"
API_KEY = "sk-test-1c2d-never-print-me"


def run_cli(settings, *args, timeout=180):
    env = {**os.environ, "KLONG_KAFKA_SASL_PASSWORD": PASSWORD, "KLONG_KAFKA_SASL_USERNAME": "klong",
           "OPENAI_API_KEY": API_KEY}
    return subprocess.run([sys.executable, "-m", "klong.cli", "-v", *klong(settings, *args)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_verbose_output_of_every_kafka_command_holds_no_secret(settings, tmp_path):
    task = make_task(tmp_path / "tasks", "sec-task")
    outputs = [
        run_cli(settings, "tasks", "import", str(task), "--split", "train"),
        run_cli(settings, "sink", "run", "--until-idle"),
        run_cli(settings, "status"),
        run_cli(settings, "rollout", "run", "--task", "sec-task", "--base-url", "http://127.0.0.1:9/v1",
                "--model", "m", "--timeout", "5", "--no-judge", "--sandbox", "unsafe-local"),
        run_cli(settings, "judge", "run", "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--until-idle"),
    ]
    text = "\n".join(o.stdout + o.stderr for o in outputs)
    assert "sasl_plain_password" in text  # the config dumps are there ...
    assert PASSWORD not in text and API_KEY not in text  # ... without the secret
    assert outputs[0].returncode == 0 and outputs[1].returncode == 0


def test_settings_repr_and_filter_mask_the_password(monkeypatch):
    monkeypatch.setenv("KLONG_KAFKA_SASL_PASSWORD", PASSWORD)
    s = Settings.load("/tmp/x", "127.0.0.1:1")
    assert s.kafka_config()["sasl_plain_password"] == PASSWORD  # the client still gets it
    assert PASSWORD not in repr(s) and PASSWORD not in str(s.kafka_config())
    assert PASSWORD not in redact(f"connecting with password={PASSWORD}")
    record = logging.LogRecord("kafka", logging.DEBUG, __file__, 1, "config: %s", ({"pw": str(PASSWORD)},), None)
    RedactingFilter().filter(record)
    assert PASSWORD not in record.getMessage()
