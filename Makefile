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

.PHONY: venv test test-multinode demo clean system-deps

venv: $(VENV)/.installed

# openmpi: the MPI launcher; slurm-wlm and munge: the tests run launchers/slurm.sbatch under a real SLURM;
# openssh-server, openssh-client, pdsh, iproute2: the deepspeed hostfile launcher and the emulated nodes of
# hipscale.tools.local_cluster (tests/test_multinode.py). Without Recommends (systemd, gfortran, a score of SLURM
# plugins we do not load): half the packages, 13-26 s less on a fresh Debian 12.
SYSTEM_COMMANDS := mpirun sbatch /usr/sbin/munged /usr/sbin/sshd ssh pdsh ip nsenter
system-deps:
	@if ! (for c in $(SYSTEM_COMMANDS); do command -v $$c >/dev/null 2>&1 || exit 1; done); then \
	  echo "[make] installing system packages: openmpi (MPI launcher), slurm-wlm and munge (SLURM launcher tests),"\
	       "openssh and pdsh (hostfile launcher), iproute2 (emulated nodes)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    openmpi-bin libopenmpi-dev ibverbs-providers libhwloc-plugins slurm-wlm munge openssh-server openssh-client \
	    pdsh iproute2 util-linux netbase >/dev/null; \
	fi

$(VENV)/.installed: setup.py Makefile
	$(MAKE) system-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools
	$(PIP) install -q "$(TORCH_SPEC)"
	DS_BUILD_OPS=0 $(PIP) install -q -e ".[train,mpi,remote,ray,test]"
	# The data bench's LitData rows. --no-deps: LitData asks for torchvision, which would pull a CUDA torch;
	# without obstore (one of its optional dependencies) it reads S3 with boto3.
	$(PIP) install -q --no-deps litdata==0.2.76 lightning-utilities==0.15.3 tifffile==2026.3.3
	touch $@

test: system-deps venv
	bash tests/run_suite.sh

# The multi-node tests alone (launchers, elastic, Ray); they fail (never skip) where emulated nodes cannot be made,
# as they do in `make test` when it runs as root.
MULTINODE_TESTS := tests/test_multinode.py tests/test_elastic.py \
  tests/test_shard_job.py::test_ray_head_and_a_second_node_killed_mid_unit_and_a_straggler_give_the_single_run
test-multinode: system-deps venv
	HIPSCALE_REQUIRE_MULTINODE=1 PYTEST_TARGETS="$(MULTINODE_TESTS)" bash tests/run_suite.sh

demo: venv
	$(PY) -m hipscale.demo

clean:
	rm -rf $(VENV) .cache build *.egg-info
