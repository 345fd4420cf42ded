# The README's two commands: `make demo` and `make test`. Each sets up .venv first if it is missing or stale.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo demo-offline test gpu-check lint clean

$(BIN)/.installed: pyproject.toml
	@# With CUDA, keep the machine's own torch (system site packages); without, install the CPU build pinned
	@# here first, so that resolving `torch` never downloads the CUDA wheels.
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV) && $(BIN)/pip install --quiet torch==2.13.0; \
	fi
	$(BIN)/pip install --quiet -e '.[test,cluster]'
	touch $@

# The HTTP server on the embedded demo (http://127.0.0.1:8000, open, the demo adapters registered); Ctrl-C drains.
demo: $(BIN)/.installed
	$(BIN)/lora-server serve

# The offline command on the same demo: server/demo/requests.jsonl, mixed adapters in one batch, one JSON line each.
demo-offline: $(BIN)/.installed
	$(BIN)/lora-server generate --requests server/demo/requests.jsonl

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/pytest -q

# On a machine with CUDA: the GPU's tests and benchmarks in one bounded run (server/gpu_check.py), results in
# gpu-check-results.md. Offline on purpose: a lent GPU machine has torch, triton, transformers and peft but no package
# index, so only this package is installed (no dependencies) into the Python that has CUDA.
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) -m pip install --quiet --no-deps --no-index --no-build-isolation -e .
	$(GPU_PYTHON) -P -m lora_server.gpu_check --out gpu-check-results.md

clean:
	rm -rf $(VENV)
