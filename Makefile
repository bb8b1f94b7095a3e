# `make run`: set up and train the default VAE.  `make test`: set up and run the tests.
# `make bench`: the CPU benchmarks of benchmarks/ (ppl_vae vs hand-written PyTorch).
# `make bench-gpu`: the GPU figures in one command (benchmarks/gpu_check.sh, under 8 minutes).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEBIAN_DATA := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
PYTEST_ARGS ?=

.PHONY: run test test-slow test-stat-sweep lint data setup clean bench bench-gpu
BENCH_ARGS ?=

setup: $(STAMP)

# pip resolves torch and torchvision together from the registry (the CPU-only torch wheel
# cannot load torchvision's compiled ops); the stamp is redone when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# Genuine Fashion-MNIST from Debian when we are root with apt-get; otherwise ppl-vae falls back
# to --data.data-dir or torchvision's download.
data:
	@if [ -f $(DEBIAN_DATA) ]; then echo "Fashion-MNIST: $(dir $(DEBIAN_DATA))"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
		|| echo "apt-get could not install dataset-fashion-mnist; torchvision will download it"; \
	else echo "not root or no apt-get: Fashion-MNIST comes from --data.data-dir or a download"; fi

run: setup data
	$(BIN)/ppl-vae train

# The notebooks run with the small budget (under a minute for all three here) through nbmake.
test: setup data lint
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)
	PPL_VAE_NOTEBOOK_BUDGET=small $(BIN)/python -m pytest --nbmake --nbmake-timeout=900 notebooks

test-slow: setup data
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

# Rerun the fast statistical tests once per seed and print the observed failure rate next to
# the budget of tests/stats.py (about 11 s per seed on one core).
STAT_SEEDS ?= 0-199
test-stat-sweep: setup data
	$(BIN)/python -m pytest --stat-seeds $(STAT_SEEDS) -m "stat and not slow" $(PYTEST_ARGS)

# CPU benchmarks, ppl_vae against hand-written PyTorch, interleaved in one process (a few
# minutes on 2 cores; see benchmarks/RESULTS.md). BENCH_ARGS goes to every script, e.g.
# BENCH_ARGS="--threads 1 --clock cpu" on a shared machine, or "--device cuda".
bench: setup data
	$(BIN)/python -m benchmarks.step_overhead $(BENCH_ARGS)
	$(BIN)/python -m benchmarks.epoch_throughput $(BENCH_ARGS)
	$(BIN)/python -m benchmarks.eval_throughput $(BENCH_ARGS)
	$(BIN)/python -m benchmarks.eval_throughput --images 10000 --repeats 1 --no-plain $(BENCH_ARGS)
	$(BIN)/python -m benchmarks.zoo_throughput --repeats 3 $(BENCH_ARGS)
	$(BIN)/python -m benchmarks.ddp_scaling $(BENCH_ARGS)
	$(BIN)/python -m benchmarks.precision $(BENCH_ARGS)

# The GPU figures of benchmarks/RESULTS.md, under 8 minutes on one H100/H200, installing
# nothing beyond setup: the CUDA tests, step/zoo/evaluation throughput, a default training run
# and the 1-process torchrun path, each under a timeout; prints a results block to paste.
# BENCH_ARGS goes to the script: "--out DIR", "--data-dir DIR", or "--device cpu --tiny" (the
# dry run that tests/test_gpu_check.py runs in `make test`).
bench-gpu: setup data
	bash benchmarks/gpu_check.sh $(BENCH_ARGS)

# ruff, and the one-way layers of pyproject.toml's import-linter contract (a lower layer that
# imports a higher one fails the build).
lint: setup
	$(BIN)/ruff check ppl_vae tests benchmarks
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
