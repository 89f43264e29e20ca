# Two commands on a fresh machine:
#   make demo   - environment + tiny models + one generated image (prints its path)
#   make test   - environment + the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
REQS   := requirements.txt requirements/dev.txt requirements/comfyui.txt requirements/constraints.txt pyproject.toml
STAMP  := $(VENV)/.x2i-env-$(shell cat $(REQS) 2>/dev/null | sha1sum | cut -c1-12)

.PHONY: env demo test clean-env

env: $(STAMP)

$(STAMP): $(REQS)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip "setuptools>=64,<82" wheel
	$(PY) -m pip install --quiet -c requirements/constraints.txt -r requirements/dev.txt -r requirements/comfyui.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: env
	$(PY) -m x2i_core demo

test: env
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean-env:
	rm -rf $(VENV)
