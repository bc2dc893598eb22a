# The two commands: `make demo` (the simulated national network) and `make test` (every test).
# Both work on a fresh Debian 12 machine as root: they install what is missing (apt-get, pip) and
# create or reuse .venv.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_ARGS ?= --once

.PHONY: demo test lint typecheck unit system-deps schema bench clean serve

demo: system-deps $(STAMP)
	$(VENV)/bin/duo-gateway demo $(DEMO_ARGS)

test: system-deps $(STAMP) lint typecheck unit

unit: system-deps $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --durations=30

lint: $(STAMP)
	$(VENV)/bin/ruff check duo_gateway tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy duo_gateway bench

# Only what is missing is installed; `apt-get update` runs at most once per call.
system-deps:
	@missing=""; \
	command -v python3 >/dev/null || missing="$$missing python3"; \
	python3 -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv python3-pip"; \
	command -v storescp >/dev/null || missing="$$missing dcmtk"; \
	command -v xmlsec1 >/dev/null || missing="$$missing xmlsec1"; \
	{ command -v Orthanc || test -x /usr/sbin/Orthanc; } >/dev/null || missing="$$missing orthanc"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so >/dev/null 2>&1 || missing="$$missing orthanc-dicomweb"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

schema: $(STAMP)
	$(VENV)/bin/duo-gateway config-schema > schemas/config.schema.json

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
