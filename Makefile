# The two commands of the README, each doing all its set-up on a fresh machine:
#   make demo   export the offline default model and run semantic search over the bundled corpus
#   make test   run the test suite (offline)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml constraints/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so that nothing after it can pull a CUDA build
	$(PY) -m pip install -q -c constraints/dev.txt torch
	$(PY) -m pip install -q -c constraints/dev.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/embedrt demo

test: $(STAMP)
	$(PY) -m pytest

# mypy through tools/typecheck.py, which lays runtime/, export/ and models/ out as the installed embedrt
# package, so imports between modules are checked (plain `mypy runtime` saw them all as Any)
lint: $(STAMP)
	$(VENV)/bin/ruff check runtime export models tests benchmarks tools
	$(PY) tools/typecheck.py benchmarks

bench: $(STAMP)
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) build *.egg-info
