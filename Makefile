# Setup is two commands: `make run` and `make test`. Everything else is here for operators and CI.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONF   ?= conf/gateway.yaml
STAMP  := $(VENV)/.installed
# The console's browser test drives Debian's Chromium through Playwright (never a browser of
# Playwright's own: `playwright install` is not used). The file itself is the stamp.
CHROMIUM := /usr/bin/chromium

.PHONY: install browser run test bench bench-translate bench-deliver conformance pki clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP) $(CHROMIUM)

$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then sudo=; \
	elif command -v sudo >/dev/null 2>&1; then sudo=sudo; \
	else echo "make: $(CHROMIUM) is missing and installing Debian's chromium needs root or sudo: run 'apt-get install chromium' as root" >&2; exit 1; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
		echo "make: $(CHROMIUM) is missing and there is no apt-get: install Chromium at $(CHROMIUM) (the browser test uses it)" >&2; exit 1; fi; \
	echo "Installing Debian's chromium for the console's browser test"; \
	$$sudo apt-get update -q && \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core \
		|| { echo "make: could not install Debian's chromium (see apt-get above); the browser test needs $(CHROMIUM)" >&2; exit 1; }
	@test -x $(CHROMIUM) || { echo "make: chromium installed but $(CHROMIUM) is missing" >&2; exit 1; }

browser: $(CHROMIUM)

certs/dev/ca.crt: | $(STAMP)
	$(BIN)/gateway pki init

pki: certs/dev/ca.crt

run: $(STAMP) certs/dev/ca.crt
	$(BIN)/gateway run --sandbox -c $(CONF)

# One pytest worker per core, four at most (each starts gateway processes and opens database
# connections of its own); TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= auto

test: $(STAMP) $(CHROMIUM)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --maxprocesses 4 $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/ingest.py $(BENCH_ARGS)
	$(BIN)/python bench/ingest_floor.py
	$(BIN)/python bench/translate.py $(TRANSLATE_ARGS)
	$(BIN)/python bench/deliver.py $(DELIVER_ARGS)

# MLLP in -> delivered to the sandbox shared record, ORU^R01 at 8 connections on PostgreSQL.
bench-deliver: $(STAMP)
	$(BIN)/python bench/deliver.py $(DELIVER_ARGS)

# Translation speed on one core (ORU^R01 with 20 OBX, ADT^A01), python-hl7 as the reference.
bench-translate: $(STAMP)
	$(BIN)/python bench/translate.py $(TRANSLATE_ARGS)

# Every HL7 v2, v2 XML and ASTM message of ../shared/corpus through the mappings; var/bench/conformance.json.
conformance: $(STAMP)
	$(BIN)/python bench/conformance.py $(CONFORMANCE_ARGS)

clean:
	rm -rf $(VENV) var/*.sqlite* build *.egg-info
