# `make run` and `make test` set everything up themselves on a fresh machine.
# A Python >= 3.13 is found on PATH or under pyenv; PYTHON=/path/to/python overrides.
PYTHON ?= $(shell for p in python3.14 python3.13 $$HOME/.pyenv/versions/3.1[3-9]*/bin/python3 /root/.pyenv/versions/3.1[3-9]*/bin/python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 13))' 2>/dev/null && { command -v $$p; break; }; done)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bench setup tools clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: no Python >= 3.13 found on PATH or under ~/.pyenv; set PYTHON=/path/to/python3.13" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/pipes worker -A apps.quickstart --until-done

# kcat (Debian) is a third-party Kafka client for the interop tests; installed when we are root.
tools:
	@command -v kcat >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kcat) >/dev/null 2>&1; } || \
		echo "note: kcat is not installed; its interop test will be skipped"

test: $(STAMP) tools
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m tests.bench.run

clean:
	rm -rf $(VENV) .pipes out
