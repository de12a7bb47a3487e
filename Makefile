# hipscale: `make demo` and `make test` set everything up themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Keep JIT-compiled torch/DeepSpeed extensions inside the tree.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
# Without a GPU: the CPU wheel of torch, pinned (an unpinned torch pulls CUDA).
TORCH_SPEC := $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)

.PHONY: venv test demo clean system-deps

venv: $(VENV)/.installed

# openmpi: the MPI launcher; slurm-wlm and munge: the tests run launchers/slurm.sbatch under a real SLURM.
system-deps:
	@if ! command -v mpirun >/dev/null 2>&1 || ! command -v sbatch >/dev/null 2>&1 || [ ! -x /usr/sbin/munged ]; then \
	  echo "[make] installing system packages: openmpi (MPI launcher), slurm-wlm and munge (SLURM launcher tests)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev \
	    slurm-wlm munge >/dev/null; \
	fi

$(VENV)/.installed: setup.py Makefile
	$(MAKE) system-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools
	$(PIP) install -q "$(TORCH_SPEC)"
	DS_BUILD_OPS=0 $(PIP) install -q -e ".[train,mpi,test]"
	touch $@

test: system-deps venv
	bash tests/run_suite.sh

demo: venv
	$(PY) -m hipscale.demo

clean:
	rm -rf $(VENV) .cache build *.egg-info
