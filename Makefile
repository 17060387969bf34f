# Two commands for a fresh machine: `make demo` and `make test`. Everything else is a building block.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ROBOTS ?= 2
# Chart.js for the console's charts, pinned, from the npm registry; re-fetched when the copy under static/ is missing.
CHARTJS_VERSION := 4.4.8
CHARTJS := static/vendor/chart.umd.js

.PHONY: install migrate demo test test-fast bench clean

install: $(VENV)/.installed $(CHARTJS)

$(CHARTJS):
	npm install --prefix var/npm --no-save --no-audit --no-fund --no-package-lock --loglevel=error chart.js@$(CHARTJS_VERSION)
	mkdir -p $(@D)
	cp var/npm/node_modules/chart.js/dist/chart.umd.js $@

# torch first and pinned: installing a torch dependant first makes pip resolve a multi-GB CUDA build. Which build of
# torch is yours to choose: TORCH_INDEX=https://download.pytorch.org/whl/cpu (CPU only, ~200 MB) or .../whl/cu126 (CUDA);
# unset, pip's own configuration decides (PyPI's default wheel is the CUDA one on x86_64 Linux).
TORCH_INDEX ?=
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) \
		$$(grep -E '^torch==' requirements.txt)
	$(PY) -m pip install -q --disable-pip-version-check $$(grep -E '^numpy==' requirements.txt)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

migrate: install
	$(PY) manage.py migrate

demo: install
	$(PY) manage.py demo --robots $(ROBOTS)

# The whole suite. Tests get their own data directory (database, payloads, embedded Redis) so that they never
# touch a running demo.
test: install
	node --test tests/js/
	SOP_DATA_DIR=$(CURDIR)/var/test $(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: install
	SOP_DATA_DIR=$(CURDIR)/var/test $(VENV)/bin/pytest -m "not e2e" $(PYTEST_ARGS)

clean:
	rm -rf var/test
