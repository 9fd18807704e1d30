# Two commands on a fresh clone:  `make demo` (set up + run a pipeline end to end)  and  `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
UV_VERSION := 0.13.9
TORCH_WHEEL := /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl

.PHONY: setup demo test lint ui bench clean

setup: $(VENV)/.installed

# A virtual environment with the pinned lock (requirements.txt) and this package, editable.
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(BIN)/uv pip install --quiet --compile-bytecode -p $(BIN)/python -r requirements.txt
	$(BIN)/uv pip install --quiet -p $(BIN)/python --no-deps -e .
# Optional: torch for the trainer's pytorch framework, only from the local CPU wheel (no CUDA downloads).
	if [ -f $(TORCH_WHEEL) ]; then $(BIN)/uv pip install --quiet --compile-bytecode -p $(BIN)/python $(TORCH_WHEEL); \
	else echo "$(TORCH_WHEEL) not found: the trainer's pytorch framework is unavailable"; fi
	touch $@

demo: setup
	$(BIN)/mlplatform lint
	$(BIN)/mlplatform demo acme__churn-xgb

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/mlplatform lint --deep

ui: setup
	$(BIN)/mlplatform ui

bench: setup
	$(BIN)/python bench/parse_bench.py

clean:
	rm -rf .mlplatform .airflow test-artifacts
