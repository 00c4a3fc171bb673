# Two commands for a newcomer: `make demo` and `make test`. Both install what they need into .venv.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
EVENTS ?= 20000
SEED   ?= 7

.PHONY: install tools demo test test-unit lint typecheck bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (Python 3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Prometheus (promtool + server) checks the shipped alert rules and scrapes a worker in the tests.
tools:
	@missing=""; \
	command -v promtool >/dev/null && command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null); \
	  else echo "need$$missing on PATH (Debian/Ubuntu: sudo apt-get install$$missing)"; exit 1; fi; fi

demo: $(STAMP)
	$(BIN)/dealpulse demo --events $(EVENTS) --seed $(SEED)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check pipelines agents models dealpulse_pkg tests

# mypy cannot follow setuptools' editable import hook, so it checks a symlinked view of the package.
typecheck: $(STAMP)
	rm -rf build/typecheck && mkdir -p build/typecheck/dealpulse
	cp dealpulse_pkg/__init__.py build/typecheck/dealpulse/__init__.py
	ln -s ../../../pipelines build/typecheck/dealpulse/pipelines
	ln -s ../../../agents build/typecheck/dealpulse/agents
	ln -s ../../../models build/typecheck/dealpulse/models
	MYPYPATH=build/typecheck $(BIN)/mypy -p dealpulse

test-unit: $(STAMP)
	$(BIN)/pytest -q tests/unit pipelines models

test: $(STAMP) tools lint typecheck
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/dealpulse bench ingest --json

clean:
	rm -rf $(VENV) build .dealpulse
