# Everything runs from a fresh Debian bookworm machine as root: `make install`
# brings in the Debian packages and the plugin's virtual environment.

SYSTEM_PYTHON := /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
DEBIAN_PACKAGES := orthanc orthanc-python orthanc-dicomweb dcmtk python3-venv chromium postgresql orthanc-postgresql

.PHONY: install demo test lint bench bench-quick clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	$(SYSTEM_PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q --group dev
	touch $@

demo: install
	$(PY) -m demo

lint: install
	$(VENV)/bin/ruff check plugin tests bench demo
	$(VENV)/bin/ruff format --check plugin tests bench demo
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest

bench: install
	$(PY) -m bench

bench-quick: install
	$(PY) -m bench --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
