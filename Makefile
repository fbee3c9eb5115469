# The two set-up commands: `make test` and `make demo`. Each creates .venv when it is missing
# and installs the package (editable) with its test extras; a second run installs nothing.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.medisyn-installed

.PHONY: test demo demo-memorize test-fast lint clean-demo browser wheelhouse bench-gpu bench-gpu-dry

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

lint: $(STAMP)  ## ruff: lint rules and formatting (line length 120, pyproject.toml), checked, never rewritten
	$(VENV)/bin/ruff check medisyn tests jobs
	$(VENV)/bin/ruff format --check medisyn tests jobs

# The reader study's browser test drives Debian's Chromium with Playwright (Playwright's own
# browser download needs the internet); installed here when missing, with sudo when not root.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

test: lint browser
	$(PY) -m pytest

test-fast: lint  ## everything but the tests marked slow (end-to-end pipeline, elastic cluster, job submission, browser)
	$(PY) -m pytest -m "not slow"

demo: $(STAMP)
	$(VENV)/bin/medisyn pipeline --config jobs/configs/demo.yaml

demo-memorize: $(STAMP)
	$(VENV)/bin/medisyn pipeline --config jobs/configs/demo-memorize.yaml

clean-demo:
	rm -rf runs/demo

# GPU figures in one visit (README, "GPU figures in one visit"). On a machine with a package index,
# `make wheelhouse` fetches into wheelhouse/py3XX every wheel a GPU node lacks, for PY=3.11 or PY=3.12
# (both by default); HAVE=FILE, a `pip freeze` taken on the node, leaves out what the node has. On the
# node, `make bench-gpu` installs from there with no network and runs every GPU benchmark (~10 min on
# one H100) into BENCH_OUT; `make bench-gpu-dry` is the same script on tiny sizes, on CPU (a minute or two).
WHEEL_PYTHONS = $(if $(filter 3.%,$(PY)),$(PY),3.11 3.12)
BENCH_OUT ?= runs/bench-gpu

wheelhouse:
	@for v in $(WHEEL_PYTHONS); do \
	  $(PYTHON) scripts/wheelhouse.py --python $$v $(if $(HAVE),--have $(HAVE)) || exit 1; done

bench-gpu:
	scripts/bench-gpu.sh $(BENCH_OUT)

bench-gpu-dry: $(STAMP)
	PYTHON=$(abspath $(PY)) scripts/bench-gpu.sh $(BENCH_OUT)-dry --dry-run
