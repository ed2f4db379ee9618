# Set-up and entry points. `make demo` and `make test` each build .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch wheel installed into the venv; on a GPU server use e.g. TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo_out

.PHONY: venv demo test bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

demo: venv
	$(PY) demo.py --out $(DEMO_DIR)

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
