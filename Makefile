# `make demo` and `make test` work on a fresh machine: they create .venv, install, then run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# vLLM runs as a separate server in a venv of its own (scripts/serve_vllm.sh); the served tests start it.
VLLM_VENV ?= $(HOME)/.cache/dlm-rl/vllm-venv
export DLM_RL_VLLM_VENV := $(VLLM_VENV)

.PHONY: demo test test-slow install clean

$(STAMP): pyproject.toml scripts/setup_env.sh
	PY=$(PY) VENV=$(VENV) bash scripts/setup_env.sh
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default: build the tiny addition base model, then TraceRL on it (accuracy before and
# after, the curve and the generations are printed at the end).
demo: $(STAMP)
	$(BIN)/python scripts/build_tiny_models.py addition3-base
	$(BIN)/dlm-rl train recipes/tracerl_tiny_addition.yaml --overwrite_output_dir true

# Two test processes (pytest-xdist), one thread each (tests/conftest.py): one per core of a 2-core machine, while
# the vLLM server venv installs (mostly downloads); then the tests that inspect machine-wide state (the sandbox's
# leftovers), by themselves; then the tests against real vLLM servers, which they start.
test: $(STAMP)
	scripts/serve_vllm.sh install > $(VENV)/vllm-install.log 2>&1 & install=$$!; \
	$(BIN)/python -m pytest -q -n 2 -m "not slow and not alone and not served"; status=$$?; \
	wait $$install || { cat $(VENV)/vllm-install.log; exit 1; }; \
	test $$status -eq 0
	$(BIN)/python -m pytest -q -m "alone and not slow"
	$(BIN)/python -m pytest -q -m "served and not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV)
