# Setup is two commands: `make run` and `make test`. Everything else is here for operators and CI.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONF   ?= conf/gateway.yaml
STAMP  := $(VENV)/.installed

.PHONY: install run test bench bench-translate bench-deliver conformance pki clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

certs/dev/ca.crt: | $(STAMP)
	$(BIN)/gateway pki init

pki: certs/dev/ca.crt

run: $(STAMP) certs/dev/ca.crt
	$(BIN)/gateway run --sandbox -c $(CONF)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/ingest.py $(BENCH_ARGS)
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
