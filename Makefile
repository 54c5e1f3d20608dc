# hotpath: `make test` and `make bench` each set up .venv on first use (pinned CPU torch), then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# the stamp changes whenever pyproject.toml does, so dependency edits reinstall
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

.PHONY: setup lint test test-fast bench bench-quick bench-serve profile clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,serve,ray]'
	rm -f $(VENV)/.installed-*
	touch $@

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) -m bench

bench-quick: $(STAMP)
	$(PY) -m bench --quick

bench-serve: $(STAMP)
	$(PY) -m bench --suite serve

profile: $(STAMP)
	$(PY) -m bench.profile

clean:
	rm -rf $(VENV) runs .pytest_cache .benchmarks
