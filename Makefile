# fsmoe — the two commands a new user runs: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP  := $(VENV)/.installed

.PHONY: run test install lint bench clean gpu-check

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is installed first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The default job: the tiny GPT-MoE on 4 CPU ranks in 2 declared nodes (MP = ESP = 2 inside a node,
# EP = 2 across nodes), about 3 minutes on 2 cores.
RUN_ARGS ?= --nproc 4 --procs-per-node 2 --mp 2 --ep 2 --esp 2 --steps 500 --overwrite

run: $(STAMP)
	$(PY) -m fsmoe train --out runs/default $(RUN_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check fsmoe tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/gates.py

# On a machine with one NVIDIA GPU, in at most 8 minutes: the CUDA tests (pytest -m cuda), the layer on
# CUDA against the CPU, bf16, the stream runtime's overlap, a tiny training run and the gates benchmark,
# as one compact report (scripts/gpu_check.py; --dry-run shows the plan without a GPU). See docs/gpu.md.
gpu-check: $(STAMP)
	$(PY) scripts/gpu_check.py

clean:
	rm -rf $(VENV) runs .pytest_cache
