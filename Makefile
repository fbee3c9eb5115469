# The two set-up commands: `make test` and `make demo`. Each creates .venv when it is missing
# and installs the package (editable) with its test extras; a second run installs nothing.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.medisyn-installed

.PHONY: test demo test-fast clean-demo

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)  ## everything but the tests marked slow (end-to-end pipeline, elastic cluster)
	$(PY) -m pytest -m "not slow"

demo: $(STAMP)
	$(VENV)/bin/medisyn pipeline --config jobs/configs/demo.yaml

clean-demo:
	rm -rf runs/demo
