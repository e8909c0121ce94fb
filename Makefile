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
	$(BIN)/mmdiff-gen generate --prompts prompts/toy.txt --images-per-prompt 4 --out $(DEMO_OUT)/dataset --overwrite
	$(BIN)/mmdiff-gen export --format coco --in $(DEMO_OUT)/dataset --out $(DEMO_OUT)/coco --overwrite
	$(BIN)/mmdiff-gen preview $(DEMO_OUT)/dataset --out $(DEMO_OUT)/preview.png

# The CPU benches in full mode (tens of minutes on 2 cores); the GPU check only where CUDA is present.
bench: $(STAMP)
	$(BIN)/python bench/capture_overhead.py
	$(BIN)/python bench/generate_job.py
	$(BIN)/python bench/compile_capture.py
	$(BIN)/python bench/storage_agreement.py
	$(BIN)/python bench/compact_cache.py
	$(BIN)/python bench/ray_engine.py
	$(BIN)/python bench/families.py
	@if $(BIN)/python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
		$(BIN)/python bench/gpu_check.py; else echo "bench/gpu_check.py: no CUDA device here, skipped"; fi

clean:
	rm -rf $(VENV) out
