# medpipe: the two commands of the README's quick start, and what they need.
#   make demo   set up, write the sample archive, run the pipeline on it (outputs in demo/out)
#   make test   set up, run the test suite (what CI runs: .ci/run)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   ?= demo

.PHONY: setup demo test browser bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

# Debian's Chromium for the browser tests (report rendering, Prefect UI). Without root or a
# package registry those tests are skipped, not failed.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "chromium could not be installed: browser tests will be skipped"; \
	  else echo "no chromium (and no root apt-get): browser tests will be skipped"; fi; }

demo: setup
	test -d $(DEMO)/archive || $(BIN)/medpipe sample-archive $(DEMO)/archive
	$(BIN)/medpipe run $(DEMO)/archive --out $(DEMO)/out

test: setup browser
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/operators.py
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/inference.py

clean:
	rm -rf $(DEMO) .pytest_cache
