# The README's two commands:
#   make demo   run the main job on the built-in default model (offline, CPU)
#   make test   run the test suite (what .ci/run calls)
# Both create the virtual environment and fetch the weights they need on a fresh machine.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On this machine `torch==2.13.0` resolves to a CPU wheel on local disk. Elsewhere, pick your build:
#   make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" test
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.reasonseg-installed
DEMO_OUT ?= out/demo
# The main job: the built-in trained model (models/lisa-mobile-synth) answers a reasoning instruction about
# a held-out synthetic test scene (a background and wording never seen in training).
DEMO_IMAGE ?= examples/synth_test_scene.jpg
DEMO_INSTRUCTION ?= What in this image can be eaten? Please output segmentation mask.

.PHONY: demo test lint system-deps fetch-weights clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Debian packages: the colour-emoji font draws the synthetic world's objects (the synthetic-data code
# raises a clear error naming the package when it is missing); chromium runs the web page's browser test
# (skipped when absent). Installed with apt when we may.
SYSTEM_PKGS := fonts-noto-color-emoji chromium
system-deps:
	@missing=""; \
	[ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || missing="$$missing fonts-noto-color-emoji"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -q $$missing >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null && apt-get install -y -q $$missing >/dev/null)) || \
	     echo "warning: could not install$$missing"; \
	  else echo "note: install Debian's$$missing (synthetic world, browser test)"; fi; \
	fi

fetch-weights: $(STAMP)
	$(VENV)/bin/reasonseg fetch mobile_sam smollm2_135m_instruct_gguf

demo: $(STAMP) system-deps fetch-weights
	$(VENV)/bin/reasonseg segment $(DEMO_IMAGE) "$(DEMO_INSTRUCTION)" --out $(DEMO_OUT)

test: $(STAMP) system-deps
	$(VENV)/bin/ruff check src tests bench
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

clean:
	rm -rf $(VENV) out .pytest_cache
