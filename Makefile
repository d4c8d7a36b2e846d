# The two commands the README promises: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.diffgentor-installed
GOLDEN ?= ../shared/golden
DEMO_DIR ?= demo_out

.PHONY: install test lint pytest verify-golden demo clean test-integration test-slow

# torch: constraints-cpu.txt pins the CPU build (torch==X+cpu), which PyPI does not have (PyPI's Linux torch is the
# CUDA build, ~20 nvidia packages with it). Where pip resolves the pin as configured (a local wheel or index: CI
# machines), nothing is added and no other host is asked; elsewhere PyTorch's CPU index is added as an extra index.
# TORCH_INDEX_URL=URL always adds URL (a mirror); TORCH_INDEX_URL= (empty) never adds one.
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?= auto
TORCH_PIN = $(shell sed -n 's/^torch==//p' constraints-cpu.txt)
TORCH_INDEX_FLAGS = $$(case "$(TORCH_INDEX_URL)" in \
	  auto) $(PY) -m pip install -q --dry-run --no-deps --retries 0 --timeout 20 'torch==$(TORCH_PIN)' \
	        >/dev/null 2>&1 || echo --extra-index-url $(TORCH_CPU_INDEX);; \
	  "") ;; \
	  *) echo --extra-index-url $(TORCH_INDEX_URL);; esac)
PIP_INSTALL = $(PY) -m pip install -q -c constraints-cpu.txt $(TORCH_INDEX_FLAGS)

$(STAMP): pyproject.toml constraints-cpu.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# the distribution used to be called `diffgentor`, which is also an unrelated PyPI project: neither may stay
	@$(PY) -m pip uninstall -q -y diffgentor >/dev/null 2>&1 || true
	$(PIP_INSTALL) -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# -rs: every skipped test with its reason (CI logs show what did not run); the 15 slowest tests at the end
pytest: $(STAMP)
	$(VENV)/bin/pytest -q -rs --durations=15

# Every golden set under $(GOLDEN) must verify; skipped (loudly) only when ../shared is absent.
verify-golden: $(STAMP)
	@if [ -d "$(GOLDEN)" ]; then \
	  set -e; for d in $(GOLDEN)/*/; do \
	    if [ -f "$$d/manifest.json" ]; then echo "== verify-golden $$d"; $(VENV)/bin/diffgentor verify-golden "$$d"; fi; \
	  done; \
	else echo "SKIP verify-golden: $(GOLDEN) not found (../shared is absent)"; fi

test: lint pytest verify-golden

# The tests marked `slow` (left out of `make test` to keep it under 10 minutes on 2 cores; each says which default
# test covers the same ground more cheaply). CI runs them after `make test`.
test-slow: $(STAMP)
	$(VENV)/bin/pytest -q -rs -m 'slow and not integration and not soak' --durations=10

# The integration tests (tests/integration, marked `integration`, not part of `make test`): a real Ray cluster, a
# real Prometheus server and a headless Chromium. Prometheus and Chromium come from the OS packages (.ci/run
# installs them: apt-get install prometheus chromium); their tests are skipped, with the reason, where absent.
INTEGRATION_STAMP := $(VENV)/.diffgentor-integration-installed
$(INTEGRATION_STAMP): $(STAMP)
	$(PIP_INSTALL) -e '.[dev,integration]'
	@touch $(INTEGRATION_STAMP)

test-integration: $(INTEGRATION_STAMP)
	$(VENV)/bin/pytest -q -m integration -rs tests/integration

demo: $(STAMP)
	$(VENV)/bin/diffgentor demo --out $(DEMO_DIR)

clean:
	rm -rf build dist *.egg-info $(DEMO_DIR)
