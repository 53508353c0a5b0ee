# nextcrm-pipelines: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install demo dev test lint bench audit clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/nextcrm-sandbox demo

# `make dev UI_PORT=3001 SANDBOX_PORT=12112 WEBHOOK_PORT=8788` runs a second instance beside the first.
UI_PORT ?= 3000
SANDBOX_PORT ?= 12111
WEBHOOK_PORT ?= 8787

dev: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/nextcrm-sandbox dev \
		--ui-port $(UI_PORT) --sandbox-port $(SANDBOX_PORT) --webhook-port $(WEBHOOK_PORT)

# The tests mostly wait on HTTP and Postgres, not the CPU: TEST_WORKERS processes run them side by side (each with
# its own sandbox and, without TEST_DATABASE_URL, its own embedded Postgres). TEST_WORKERS=0 runs them in one.
TEST_WORKERS ?= 4

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python benchmarks/stripe_sync.py
	$(BIN)/python benchmarks/xero_backfill.py
	$(BIN)/python benchmarks/webhooks.py

# Known advisories in every installed distribution but this project, by pip-audit (PyPI's advisory
# data, per release). --strict: a distribution it could not check (no network, an index without
# per-release data) fails the target, so an audit that checked nothing never passes.
audit: install
	$(BIN)/python -m pip install --quiet -e '.[dev,audit]'
	$(BIN)/python -m pip freeze --all --exclude-editable > $(VENV)/audited-requirements.txt
	$(BIN)/python -m pip_audit --strict --progress-spinner off --disable-pip --no-deps \
		-r $(VENV)/audited-requirements.txt \
		|| { echo "make audit: FAILED: a known vulnerability, or a package pip-audit could not check (above)" >&2; exit 1; }

clean:
	-test -x $(BIN)/nextcrm-pipelines && $(BIN)/nextcrm-pipelines db stop
	rm -rf $(VENV) .nextcrm
