# hotpath: `make test` and `make bench` each set up .venv on first use (pinned CPU torch), then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# the stamp changes whenever pyproject.toml does, so dependency edits reinstall
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

.PHONY: setup lint test test-fast bench bench-quick bench-peers bench-serve kernel-report soak profile clean

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

# GPT-2 124M through hotpath and the CPU engines (CTranslate2, onnxruntime-genai, Optimum, llama.cpp, transformers)
# in their own venv; a peer that fails to install is a row with the reason. llama.cpp is compiled for this CPU.
PEERS_VENV := .venv-peers
PEERS_PY := $(PEERS_VENV)/bin/python
PEERS_STAMP := $(PEERS_VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
PEERS_CMAKE_ARGS ?= -DGGML_NATIVE=ON
PEERS_ARGS ?= --readme README.md

$(PEERS_STAMP): pyproject.toml
	test -x $(PEERS_PY) || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_PY) -m pip install -q --upgrade pip
	CMAKE_ARGS="$(PEERS_CMAKE_ARGS)" $(PEERS_PY) bench/peers_install.py
	rm -f $(PEERS_VENV)/.installed-*
	touch $@

bench-peers: $(PEERS_STAMP)
	$(PEERS_PY) -m bench.peers $(PEERS_ARGS)

bench-serve: $(STAMP)
	$(PY) -m bench --suite serve

# static sm_90a report of every Triton kernel (compiled on the CPU; no GPU needed)
kernel-report: $(STAMP)
	$(PY) -m bench.kernel_report --markdown bench/results/kernels-sm90.md

# a bounded mixed load (streams, disconnects, malformed requests) against the tiny model; exit 1 on RSS growth or a 5xx
SOAK_CKPT := runs/soak/tiny.pt
SOAK_ARGS ?= --duration 300
$(SOAK_CKPT): | $(STAMP)
	$(PY) -m model.train --preset tiny --steps 80 --batch-size 16 --corpus-bytes 400000 --vocab-size 512 \
		--eval-every 80 --out $@ --quiet

soak: $(STAMP) $(SOAK_CKPT)
	$(PY) -m serve.soak $(SOAK_CKPT) $(SOAK_ARGS)

profile: $(STAMP)
	$(PY) -m bench.profile

clean:
	rm -rf $(VENV) $(PEERS_VENV) runs .pytest_cache .benchmarks
