# Two entry points: `make demo` and `make test`. Each creates the virtual environment it needs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The local CPU wheel here; on a GPU node set TORCH_SPEC to your CUDA build (e.g. torch==2.13.0 from the cu index).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.mmdiff-installed
DEMO_OUT ?= out/demo

.PHONY: test demo bench env clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH_SPEC)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

env: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/mmdiff-gen inspect --model toy
	$(BIN)/mmdiff-gen capture --model toy --prompts prompts/toy.txt --out $(DEMO_OUT)/capture --concepts seg --device cpu --dtype float32
	$(BIN)/mmdiff-gen toy fidelity --n 8 --objects 1,2 --sheet $(DEMO_OUT)/sheet.png

bench: $(STAMP)
	$(BIN)/python bench/capture_overhead.py

clean:
	rm -rf $(VENV) out
