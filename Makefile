# The README's two commands (plus the pieces they are made of). Everything runs on a CPU-only machine, offline
# apart from PyPI and the Debian mirror used by the installs.
#
#   make demo    install (.venv) and run the main job: git commits -> CommitPackFT filters -> BPE tokenizer ->
#                .bin/.idx -> tiny finetune through launch/finetune.sh (tp=2 torchrun) -> HF export + transformers
#                generate -> HumanEvalPack hook; prints where everything went (DEMO_DIR, default demo/)
#   make test    install everything the tests need (.venv, SLURM + munge, HumanEvalPack toolchains) and run the
#                whole suite; the SLURM tests must not skip here (MEGAOCTO_REQUIRE_SLURM=1). .ci/run calls this.
#   make setup   only the virtualenv (.ci/setup)
SHELL := /bin/bash
PY := .venv/bin/python
DEMO_DIR ?= demo
DEMO_ARGS ?=
PYTEST_ARGS ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup system-deps demo test slurm-up slurm-down

setup:
	bash .ci/setup

# Debian packages: slurmctld slurmd slurm-client munge (launch/local_slurm.sh) and the HumanEvalPack toolchains
# (launch/setup_toolchains.sh: go, boost, testify, rust crates). Both skip what is already installed.
system-deps:
	$(SUDO) bash launch/local_slurm.sh install
	$(SUDO) bash launch/setup_toolchains.sh

demo: setup
	$(PY) -m megaocto.cli demo --workdir $(DEMO_DIR) --launcher launch/finetune.sh --tp 2 --hf --eval-limit 2 \
	    $(DEMO_ARGS)

test: setup system-deps
	MEGAOCTO_REQUIRE_SLURM=1 $(PY) -m pytest -q tests $(PYTEST_ARGS)

# A one-node SLURM cluster on this machine, to try `sbatch launch/finetune.sh` by hand (see docs/launch.md).
slurm-up:
	$(SUDO) bash launch/local_slurm.sh up

slurm-down:
	$(SUDO) bash launch/local_slurm.sh down
