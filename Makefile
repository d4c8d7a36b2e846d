# The two commands the README promises: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.diffgentor-installed
GOLDEN ?= ../shared/golden
DEMO_DIR ?= demo_out

.PHONY: install test lint pytest verify-golden demo clean test-integration

$(STAMP): pyproject.toml constraints-cpu.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-cpu.txt -e '.[dev]'
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

# The integration tests (tests/integration, marked `integration`, not part of `make test`): a real Ray cluster, a
# real Prometheus server and a headless Chromium. Prometheus and Chromium come from the OS packages (.ci/run
# installs them: apt-get install prometheus chromium); their tests are skipped, with the reason, where absent.
INTEGRATION_STAMP := $(VENV)/.diffgentor-integration-installed
$(INTEGRATION_STAMP): $(STAMP)
	$(PY) -m pip install -q -c constraints-cpu.txt -e '.[dev,integration]'
	@touch $(INTEGRATION_STAMP)

test-integration: $(INTEGRATION_STAMP)
	$(VENV)/bin/pytest -q -m integration -rs tests/integration

demo: $(STAMP)
	$(VENV)/bin/diffgentor demo --out $(DEMO_DIR)

clean:
	rm -rf build dist *.egg-info $(DEMO_DIR)
