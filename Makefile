# Two commands on a fresh machine:
#   make demo   - environment + tiny models + the text2image workflow run in a real ComfyUI (prints the PNG path)
#   make test   - environment + the test suite
# Two supported stacks (README, Supported versions), each with its own environment:
#   STACK=current (default): torch 2.14.1, transformers 5.24, diffusers 0.42.1, ComfyUI 0.28.1, frontend 1.58.1
#   STACK=2025             : torch 2.11.0, transformers 4.57.6, diffusers 0.35.2, ComfyUI 0.3.75, frontend 1.32.9
PYTHON ?= python3
STACK  ?= current
ifeq ($(STACK),current)
VENV   ?= .venv
COMFY_VERSION := 0.28.1
else ifeq ($(STACK),2025)
VENV   ?= .venv-2025
COMFY_VERSION := 0.3.75
else
$(error STACK must be 'current' or '2025', not '$(STACK)')
endif
PY     := $(VENV)/bin/python
PINS   := requirements/stack-$(STACK).txt
HOST_REQS := requirements/comfyui-$(COMFY_VERSION).txt
REQS   := requirements.txt requirements/dev.txt $(HOST_REQS) $(PINS) pyproject.toml
# The environment's fingerprint; pyproject.toml's [tool.pytest*] / [tool.ruff*] tables (markers, lint) leave it alone.
ENV_FILES := $(filter-out pyproject.toml,$(REQS))
STAMP  := $(VENV)/.x2i-env-$(shell { cat $(ENV_FILES); awk '/^\[/ { skip = /^\[tool\.(pytest|ruff)/ } !skip' pyproject.toml; } 2>/dev/null | sha1sum | cut -c1-12)
# The tools and tests read the stack's host version from here (tools/comfy_fetch.py).
export X2I_COMFY_VERSION := $(COMFY_VERSION)

REFSTACK   ?= .refstack
REF_REQS   := requirements/reference-stack.txt
REF_STAMP  := $(REFSTACK)/.x2i-ref-$(shell cat $(REF_REQS) 2>/dev/null | sha1sum | cut -c1-12)

MINI_STACK := .refstack-minicpmo
MINI_REQS  := requirements/reference-minicpmo.txt
MINI_STAMP := $(MINI_STACK)/.x2i-ref-$(shell cat $(MINI_REQS) 2>/dev/null | sha1sum | cut -c1-12)

.PHONY: env refstack refstack-minicpmo browser comfy-cli demo demo-cli test test-stack test-fast gpu-wheels clean-env

env: $(STAMP) $(VENV)/x2i-comfy-version

# The venv says which host its stack goes with, for a bare `.venv/bin/python -m pytest` (tools/comfy_fetch.py).
$(VENV)/x2i-comfy-version: | $(STAMP)
	echo $(COMFY_VERSION) > $@

# The reference's own software (transformers 4.49.0, tokenizers 0.21.0, qwen-vl-utils 0.0.10) in a side
# folder, put first on PYTHONPATH by the fidelity oracle (tests/test_reference_oracle.py) beside the
# venv's torch; never imported by the pack.
refstack: $(REF_STAMP)

# MiniCPM-o's reference stack (transformers 4.48.0, tokenizers 0.21.0: what the reference README asks for with
# MiniCPM), for the oracle that runs the reference repository's own MiniCPM-o code (tests/test_minicpmo_oracle.py).
refstack-minicpmo: $(MINI_STAMP)

$(MINI_STAMP): $(MINI_REQS) | $(STAMP)
	rm -rf $(MINI_STACK) $(MINI_STACK).tmp
	$(PY) -m pip install --quiet --no-deps --target $(MINI_STACK).tmp -r $(MINI_REQS)
	mv $(MINI_STACK).tmp $(MINI_STACK)
	touch $@

$(REF_STAMP): $(REF_REQS) | $(STAMP)
	rm -rf $(REFSTACK) $(REFSTACK).tmp
	$(PY) -m pip install --quiet --no-deps --target $(REFSTACK).tmp -r $(REF_REQS)
	mv $(REFSTACK).tmp $(REFSTACK)
	touch $@

$(STAMP): $(ENV_FILES)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip "setuptools>=77,<82" wheel
	$(PY) -m pip install --quiet -c $(PINS) -r requirements/dev.txt -r $(HOST_REQS)
	$(PY) -m pip check
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	echo $(COMFY_VERSION) > $(VENV)/x2i-comfy-version
	touch $(STAMP)

# The Registry's own CLI (comfy node validate / pack), in a venv of its own so that it moves none of the stack's
# packages; tests/test_publish.py runs it.
COMFY_CLI := .comfy-cli/bin/comfy
comfy-cli: $(COMFY_CLI)

$(COMFY_CLI): requirements/comfy-cli.txt
	rm -rf .comfy-cli
	$(PYTHON) -m venv .comfy-cli
	.comfy-cli/bin/pip install --quiet -r requirements/comfy-cli.txt
	touch $@

# Headless Chromium for the frontend tests (Debian packages; needs root, skipped otherwise).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
		|| echo "warning: could not install chromium; frontend tests will fail under CI"; \
	else echo "note: chromium/chromedriver missing; the frontend tests are skipped"; fi

# The text2image workflow through the real ComfyUI executor on the tiny models.
demo: env
	$(PY) tools/comfy_host.py demo

# The same models through the standalone x2i_core pipeline (no ComfyUI).
demo-cli: env
	$(PY) -m x2i_core demo

# Both ends of the supported range, in one command: the whole suite on the 2025 stack, then the focused subset
# on the current one (CURRENT_SUBSET below: the library / encoder / trainer tests of test-fast, the 4.49
# oracles, the install replay, every shipped workflow in the 0.28.1 server's executor, every shipped config for
# two steps + a resume, and every workflow opened and run from Run in frontend 1.58.1 - the PNG drag-in test
# runs in the whole suite only; ~17 minutes, so that all of `make test` stays under an hour on 2 cores).
# `make test-stack STACK=current` runs the whole suite on the current stack (~48 minutes).
CURRENT_SUBSET ?= (not comfy and not frontend and not slow) or oracle or install_replay or workflows or configs or frontend or publish
# The current stack's environment is built in the background while the 2025 stack's tests run (its log:
# .x2i-env-current.log), so a fresh clone does not wait for it afterwards.
test:
	@$(MAKE) --no-print-directory env STACK=current > .x2i-env-current.log 2>&1 & envpid=$$!; \
	$(MAKE) --no-print-directory test-stack STACK=2025 PYTEST_ARGS='-m "not install_replay" $(PYTEST_ARGS)'; rc=$$?; \
	if ! wait $$envpid; then cat .x2i-env-current.log; echo "make env STACK=current failed"; exit 1; fi; \
	[ $$rc -eq 0 ] || exit $$rc; \
	$(MAKE) --no-print-directory test-stack STACK=current PYTEST_ARGS='-m "$(CURRENT_SUBSET)" -k "not loads_from_its_png" $(PYTEST_ARGS)'

test-stack: env refstack refstack-minicpmo browser comfy-cli
	@echo "== stack $(STACK): $$($(PY) -c 'import torch, transformers, diffusers; print("torch", torch.__version__, "transformers", transformers.__version__, "diffusers", diffusers.__version__)'), ComfyUI $(COMFY_VERSION)"
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The fast dev loop (see README, Development): the suite without the tests marked comfy (real ComfyUI host),
# frontend (headless Chromium) or slow (pyproject.toml markers); needs neither .refstack nor chromium.
test-fast: env comfy-cli
	$(PY) -m pytest -q -m "not comfy and not frontend and not slow" $(PYTEST_ARGS)

# Wheels the lent GPU machine lacks (it reaches no registry): pass `carry: [".gpu-wheels"]` to the device run,
# then `bash benchmarks/gpu_check.sh` there installs them into .gpu-deps/ and .gpu-refstack/.
GPU_WHEELS = transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2 diffusers==0.35.2 safetensors==0.8.0
gpu-wheels: env
	rm -rf .gpu-wheels && mkdir -p .gpu-wheels/refstack
	$(PY) -m pip download -q --no-deps --only-binary=:all: -d .gpu-wheels $(GPU_WHEELS)
	-$(PY) -m pip download -q --no-deps --only-binary=:all: -d .gpu-wheels liger-kernel
	$(PY) -m pip download -q --no-deps --only-binary=:all: -d .gpu-wheels/refstack -r requirements/reference-stack.txt
	$(PY) -c "from tools.comfy_fetch import ensure_comfyui; import os, shutil; shutil.copytree(os.path.join(ensure_comfyui(), 'comfy', 'text_encoders', 'qwen25_tokenizer'), '.gpu-wheels/qwen25_tokenizer')"
	du -sh .gpu-wheels

clean-env:
	rm -rf .venv .venv-2025 $(REFSTACK) $(MINI_STACK)
