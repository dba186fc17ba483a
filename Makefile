# `make run` and `make test` set everything up themselves on a fresh machine.
# A Python >= 3.13 is found on PATH or under pyenv; PYTHON=/path/to/python overrides.
PYTHON ?= $(shell for p in python3.14 python3.13 $$HOME/.pyenv/versions/3.1[3-9]*/bin/python3 /root/.pyenv/versions/3.1[3-9]*/bin/python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 13))' 2>/dev/null && { command -v $$p; break; }; done)
VENV := .venv
PY := $(VENV)/bin/python
# make bench: every measurement this many times, the best counting (the machines are noisy).
BENCH_REPEAT ?= 3
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

# kcat (Debian) is a third-party Kafka client for the interop tests; chromium renders the
# worker's live page in test_web.py. Installed when we are root.
tools:
	@command -v kcat >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kcat) >/dev/null 2>&1; } || \
		echo "note: kcat is not installed; its interop test will be skipped"
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; } || \
		echo "note: chromium is not installed; the live page test will be skipped"

# Two pytest workers (each with its own Tansu broker), a file per worker at a time; then,
# alone, the tests marked serial (they measure speed, or are sensitive to load).
test: $(STAMP) tools
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not serial"
	$(PY) -m pytest -q -m serial

# The peers pipes is measured against, in a venv of their own made from .venv's Python, so
# they never change the versions of what pipes depends on. Bytewax has no CPython 3.13 wheel:
# its install is tried, and when it fails the suite reports it as not measured.
PEERS_VENV := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed
PEERS := quixstreams==3.28.1 faust-streaming==0.15.3

$(PEERS_STAMP): $(STAMP)
	@test -x $(PEERS_VENV)/bin/python || "$$($(PY) -c 'import sys; print(sys._base_executable)')" -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q --disable-pip-version-check $(PEERS)
	@$(PEERS_VENV)/bin/python -m pip install -q --disable-pip-version-check --only-binary=:all: bytewax >/dev/null 2>&1 || \
		echo "note: bytewax does not install on this Python (no wheel for it); the bench reports it as not measured"
	@touch $(PEERS_STAMP)

bench: $(STAMP) $(PEERS_STAMP)
	$(PY) -m tests.bench.run --repeat $(BENCH_REPEAT)

clean:
	rm -rf $(VENV) $(PEERS_VENV) .pipes out
