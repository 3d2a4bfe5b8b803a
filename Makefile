# Everything runs from a fresh Debian bookworm machine as root: `make install`
# brings in the Debian packages and the plugin's virtual environment.

SYSTEM_PYTHON := /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
DEBIAN_PACKAGES := $(shell grep -v -e '^\#' -e '^ *$$' tools/debian-packages.txt)
# The Orthanc stacks `make test` runs the suite on (tools/matrix); STACKS=host for this one only.
STACKS ?= host trixie forky
# axe-core, for the accessibility check of the browser tests: fetched here, where the network is
# at hand (the tests run without one), into build/, never committed.
AXE_VERSION := 4.14.1
AXE := build/test/axe-core-$(AXE_VERSION)/package/axe.min.js

.PHONY: install demo test lint screenshots docker-check bench bench-quick clean

install: $(VENV)/.installed $(AXE)

$(AXE): $(VENV)/.installed
	mkdir -p build/test/axe-core-$(AXE_VERSION)
	cd build/test/axe-core-$(AXE_VERSION) && npm pack --silent axe-core@$(AXE_VERSION) >/dev/null \
	  && tar -xzf axe-core-$(AXE_VERSION).tgz package/axe.min.js

$(VENV)/.installed: pyproject.toml tools/debian-packages.txt
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
	tools/matrix $(STACKS)

# The browser tests write their screenshots to build/screenshots; this puts them in the README.
screenshots: install
	rm -rf build/screenshots
	$(PY) -m pytest -q -p no:cacheprovider tests/browser -k screenshots
	cp build/screenshots/*.png docs/screenshots/

# docker/Dockerfile's pip step with Debian forky's Python 3.14, the image's (also part of `make test`).
docker-check:
	tools/matrix docker-check

bench: install
	$(PY) -m bench

bench-quick: install
	$(PY) -m bench --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
