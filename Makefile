# Everything runs from a fresh Debian bookworm machine as root: `make install`
# brings in the Debian packages and the plugin's virtual environment.

SYSTEM_PYTHON := /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
DEBIAN_PACKAGES := orthanc orthanc-python orthanc-dicomweb dcmtk python3-venv chromium postgresql orthanc-postgresql

.PHONY: install demo test lint bench bench-quick screenshots clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@# npm fetches axe-core for the browser tests; any npm will do (Debian's, or Node's own).
	@command -v npm >/dev/null || { echo "Installing Debian package: npm"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm; }
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

# The browser tests write their pictures into build/screenshots/; this publishes them.
screenshots: install
	$(PY) -m pytest -q -m browser -k screenshots
	mkdir -p docs/screenshots && cp build/screenshots/*.png docs/screenshots/

bench: install
	$(PY) -m bench

bench-quick: install
	$(PY) -m bench --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
