# medpipe: the two commands of the README's quick start, and what they need.
#   make demo   set up, write the sample archive, run the pipeline on it (outputs in demo/out)
#   make test   set up, run the test suite (what CI runs: .ci/run)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   ?= demo

.PHONY: setup demo test system-packages browser bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

# Debian packages the tests use, as command:package: Chromium (report rendering, Prefect UI),
# dicom3tools (dciodvfy, the DICOM validator), dcmtk (reference DIMSE clients), dcm2niix, Orthanc
# and its DICOMweb plugin (the real PACS of tests/pacs; an entry starting with / is a file, not a
# command). Run as root with apt-get, each missing one is installed; one that cannot be is
# reported and the tests that need it are skipped, not failed.
SYSTEM_PACKAGES := chromium:chromium dciodvfy:dicom3tools dcmdump:dcmtk dcm2niix:dcm2niix \
  Orthanc:orthanc /usr/share/orthanc/plugins/libOrthancDicomWeb.so:orthanc-dicomweb
HAVE = have() { case "$$1" in /*) test -e "$$1";; *) command -v "$$1" >/dev/null 2>&1 || test -x "/usr/sbin/$$1";; esac; }

system-packages:
	@$(HAVE); missing=""; for cp in $(SYSTEM_PACKAGES); do \
	  have $${cp%%:*} || missing="$$missing $${cp#*:}"; done; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  apt-get update -qq >/dev/null 2>&1 || true; \
	  for p in $$missing; do \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$p >/dev/null 2>&1 || true; \
	  done; \
	fi; \
	for cp in $(SYSTEM_PACKAGES); do have $${cp%%:*} || \
	  echo "$${cp#*:} is not installed (apt-get needs root and a package registry): tests that use $${cp%%:*} will be skipped"; \
	done

browser: system-packages  # its former name

demo: setup
	test -d $(DEMO)/archive || $(BIN)/medpipe sample-archive $(DEMO)/archive
	$(BIN)/medpipe run $(DEMO)/archive --out $(DEMO)/out

test: setup system-packages
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/operators.py
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/inference.py

clean:
	rm -rf $(DEMO) .pytest_cache
