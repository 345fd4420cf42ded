# The README's two commands: `make demo` and `make test`. Each sets up .venv first if it is missing or stale.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test lint clean

$(BIN)/.installed: pyproject.toml
	@# With CUDA, keep the machine's own torch (system site packages); without, install the CPU build pinned
	@# here first, so that resolving `torch` never downloads the CUDA wheels.
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV) && $(BIN)/pip install --quiet torch==2.13.0; \
	fi
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/lora-server generate --requests server/demo/requests.jsonl

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV)
