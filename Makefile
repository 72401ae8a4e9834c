# Setup is two commands: `make run` and `make test`. Everything else is here for operators and CI.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONF   ?= conf/gateway.yaml
STAMP  := $(VENV)/.installed

.PHONY: install run test bench pki clean

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
	$(BIN)/gateway run -c $(CONF)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/ingest.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var/*.sqlite* build *.egg-info
