# nanoforge: `make test` and `make demo` each work on a fresh machine (they install first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nanoforge-installed

.PHONY: install chromium demo test test-fast bench lint clean

install: $(STAMP)

# Idempotent: reruns only when pyproject.toml changes. torch is pinned to the CPU build that this machine
# has on disk *only if no torch is present*, so a GPU user's own torch build is kept.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

# tests/test_web_chat.py drives the Debian chromium through Playwright (never `playwright install`)
chromium:
	@test -x /usr/bin/chromium || { S=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$S apt-get update -qq && $$S apt-get install -y -qq chromium >/dev/null; }

demo: install
	$(VENV)/bin/nanoforge demo

test: install chromium
	$(PY) -m pytest -q

test-fast: install chromium
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) benchmarks/bench_crawl.py
	$(PY) benchmarks/bench_extract.py
	$(PY) benchmarks/bench_clean.py
	$(PY) benchmarks/bench_dedup.py
	$(PY) benchmarks/bench_tokenize.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_generate.py
	$(PY) benchmarks/bench_serve.py
	$(PY) benchmarks/bench_grpo.py
	$(PY) benchmarks/bench_rlhf.py
	$(PY) benchmarks/bench_sft.py

lint: install
	$(VENV)/bin/ruff check nanoforge tests benchmarks

clean:
	rm -rf runs bench-results .pytest_cache
