# The two quickstart commands: `make demo` and `make test`. Both set everything up first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= $(shell nproc)

.PHONY: demo test setup install demo-data weights bench clean

install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

demo-data: install
	$(BIN)/featscope data demo --out data/demo
	$(BIN)/featscope data textures --out data/textures

weights: install
	$(BIN)/featscope weights fetch mobilenet_v2

setup: install demo-data weights

demo: setup
	$(BIN)/snakemake --cores $(CORES) --configfile config/demo.yaml
	@echo "featscope: demo results are in runs/demo/"

# --durations: the slowest tests, to keep the suite near 15 minutes
test: setup
	$(BIN)/python -m pytest -q -rs --durations=15

bench: install
	$(BIN)/python benchmarks/extract_throughput.py

clean:
	rm -rf runs .snakemake
