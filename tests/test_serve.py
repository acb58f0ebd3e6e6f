"""`klong serve`: the real vLLM server on SmolLM2 (the session's `policy_server`), its CLI, and a weight
reload without a restart that changes greedy output to exactly the new weights' output."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from urllib import request

import pytest
import torch

from services import serve
from services.broker import free_port
from core.procs import pid_alive


def klong(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "klong", *args], capture_output=True, text=True, timeout=timeout)


def prompt_ids(model_dir: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def greedy(server: serve.PolicyServer, ids: list[int], n: int = 12) -> tuple[list[int], list[float]]:
    """Greedy completion of a token-id prompt: the sampled ids and their logprobs as served."""
    body = {"model": server.model_name, "prompt": ids, "max_tokens": n, "temperature": 0, "logprobs": 0,
            "return_token_ids": True}
    req = request.Request(f"{server.base_url}/completions", data=json.dumps(body).encode(),
                          headers={"Content-Type": "application/json"})
    choice = json.load(request.urlopen(req, timeout=300))["choices"][0]
    return choice["token_ids"], choice["logprobs"]["token_logprobs"]


def forward_logprobs(model_dir: Path, ids: list[int], out: list[int]) -> list[float]:
    """The logprob of each `out` token after `ids` under a transformers float32 forward of `model_dir`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([ids + out])).logits[0]
    lp = torch.log_softmax(logits.float(), -1)
    return [lp[len(ids) - 1 + i, t].item() for i, t in enumerate(out)]


def perturbed_checkpoint(model_dir: Path, out: Path, seed: int = 0, scale: float = 0.02) -> Path:
    """A checkpoint of the same architecture with every weight moved by scale * std * N(0, 1)
    (the tied embedding / output matrix included)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std())
    model.save_pretrained(out)
    return out


@pytest.mark.timeout(900)  # the first real-model test pays for the session's model import and server start
def test_serve_status_and_idempotent_start(policy_server, smollm2_dir, tmp_path):
    home = str(policy_server.state_file.parent)
    info = json.loads(klong("serve", "status", "--json", "--home", home).stdout)
    assert info["running"] and info["healthy"]
    assert info["model"] == str(Path(smollm2_dir).resolve()) and info["checkpoint"] == info["model"]
    assert (info["device"], info["dtype"], info["policy_version"]) == ("cpu", "float32", 0)
    assert info["base_url"] == policy_server.base_url
    # what the runner needs: the served name, token ids and logprobs of a completion
    ids, lps = greedy(policy_server, prompt_ids(smollm2_dir, "Say hello."), n=4)
    assert len(ids) == len(lps) == 4 and all(lp <= 0 for lp in lps)
    # start again on the same home and model: the running server, no second one
    out = klong("serve", "start", "--model", str(smollm2_dir), "--home", home)
    assert out.returncode == 0 and f"pid {policy_server.state.pid}" in out.stdout, out.stderr
    # another model on the same home is refused with a clear error
    other = tmp_path / "other-model"
    other.mkdir()
    (other / "config.json").write_text((Path(smollm2_dir) / "config.json").read_text())
    out = klong("serve", "start", "--model", str(other), "--home", home)
    assert out.returncode == 2 and "already runs" in out.stderr
    out = klong("serve", "start", "--model", str(tmp_path), "--home", str(tmp_path / "h2"))
    assert out.returncode == 2 and "no config.json" in out.stderr


def test_serve_stop_ends_a_starting_server(smollm2_dir, tmp_path):
    """`klong serve stop` finds a server from its state file (written before it is healthy) and ends its
    whole process group; `status` then says none is recorded."""
    home = str(tmp_path / "h")
    starter = subprocess.Popen([sys.executable, "-m", "klong", "serve", "start", "--model", str(smollm2_dir),
                                "--home", home, "--port", str(free_port())], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    state = Path(home) / "serve.json"
    deadline = time.monotonic() + 120
    while not state.exists() and starter.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert state.exists(), starter.communicate()
    pid = json.loads(state.read_text())["pid"]
    assert pid_alive(pid)
    out = klong("serve", "stop", "--home", home)
    assert out.returncode == 0 and f"pid {pid}" in out.stdout
    assert not pid_alive(pid) and not state.exists()
    assert starter.wait(timeout=120) != 0  # its start failed: the server went away before /health
    assert "no policy server" in klong("serve", "status", "--home", home).stdout


@pytest.mark.timeout(900)
def test_reload_changes_greedy_output_to_the_new_weights(policy_server, smollm2_dir, tmp_path):
    base = Path(policy_server.state.model)
    ids = prompt_ids(smollm2_dir, "Write one sentence about the sea.")
    before, before_lps = greedy(policy_server, ids)
    ckpt = perturbed_checkpoint(smollm2_dir, tmp_path / "step-000001")
    try:
        out = klong("serve", "reload", str(ckpt), "--policy-version", "1", "--no-restart",
                    "--home", str(policy_server.state_file.parent), timeout=600)
        assert out.returncode == 0 and out.stdout.startswith("reload in "), out.stdout + out.stderr
        after, after_lps = greedy(policy_server, ids)
        assert after != before  # greedy output changed ...
        new = forward_logprobs(ckpt, ids, after)  # ... to what the new weights give, output layer included
        assert max(abs(a - b) for a, b in zip(new, after_lps)) < 1e-3
        old = forward_logprobs(base, ids, after)
        assert max(abs(a - b) for a, b in zip(old, after_lps)) > 1e-2
        info = json.loads(klong("serve", "status", "--json", "--home", str(policy_server.state_file.parent)).stdout)
        assert info["checkpoint"] == str(ckpt.resolve()) and info["policy_version"] == 1
        assert info["last_reload"]["method"] == "reload"
    finally:
        back = serve.PolicyServer.from_home(policy_server.state_file.parent).reload(base, 0, allow_restart=False)
        policy_server.state = serve.PolicyServer.from_home(policy_server.state_file.parent).state
    assert back.method == "reload"
    assert greedy(policy_server, ids) == (before, pytest.approx(before_lps, abs=1e-4))


def test_reload_refuses_a_directory_without_a_model(policy_server, tmp_path):
    out = klong("serve", "reload", str(tmp_path), "--policy-version", "3",
                "--home", str(policy_server.state_file.parent))
    assert out.returncode == 2 and "no config.json" in out.stderr
    assert policy_server.healthy()
