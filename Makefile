# vats: `make demo` and `make test` are all a fresh clone needs.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

# uv, installed with pip when the machine has none (then run as `python3 -m uv`).
UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
RUN := $(UV) run --locked --all-packages
PYTEST_ARGS ?=
# Tests run tiny models: one intra-op thread is as fast for them, and it cannot stall on
# a busy second core (two OpenMP threads wait on each other at every op when the other
# core is taken). Benchmarks and the demo keep torch's default.
TEST_ENV := OMP_NUM_THREADS=1

# Workspace packages: <short name> -> directory. `make test-<short>` runs one
# package's tests in an environment that holds only it and what it declares.
PKG_DIR_core := packages/vats-core
PKG_DIR_text := packages/vats-text
PKG_DIR_vision := packages/vats-vision
PKG_DIR_audio := packages/vats-audio
PKG_DIR_diffusion := packages/vats-diffusion
PKG_DIR_apps := apps
PACKAGES := core text vision audio diffusion apps

.PHONY: setup uv sync demo test lint test-root bench build clean train-distributed test-gpu $(addprefix test-,$(PACKAGES))

uv:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 \
		|| python3 -m pip install --quiet uv

# Bytecode compiled once at install (about 20 s for torch and the rest; a no-op after):
# every `vats` process then starts without compiling thousands of modules, which an
# environment with PYTHONDONTWRITEBYTECODE set would otherwise redo on every start.
setup: uv
	$(UV) sync --locked --all-packages --compile-bytecode

# The text model, then the vision and audio proofs, then the multimodal LM built on all
# of them, then text to image, audio and video; each trains once and is cached
# (~/.cache/vats). Each writes runs/<pipeline>/result.json; the report gathers them into
# runs/report/index.html.
demo: setup
	$(RUN) vats pipeline=text_generation
	$(RUN) vats pipeline=train_vision
	$(RUN) vats pipeline=train_audio
	$(RUN) vats pipeline=train_multimodal
	$(RUN) vats pipeline=text_to_image
	$(RUN) vats pipeline=text_to_audio
	$(RUN) vats pipeline=text_to_video
	$(RUN) vats pipeline=report

# The text pipeline trained by 2 ranks under torchrun (gloo on CPU, NCCL with CUDA), FSDP2
# by default, over a global batch of 16 rows, tiny and short; rank 0 prints and writes
# runs/train-distributed/result.json. DP=ddp or DP=fsdp; EP=2 (with either) also splits the
# MoE experts over the 2 ranks (expert parallelism); it trains anew each time.
DP ?= fsdp
EP ?= 1
train-distributed: setup
	OMP_NUM_THREADS=1 VATS_CACHE_DIR=$(CURDIR)/outputs/train-distributed-cache \
		$(RUN) torchrun --nproc-per-node 2 -m vats_apps pipeline=text_generation \
		train.parallel.data_parallel=$(DP) train.parallel.expert_parallel=$(EP) pipeline.retrain=true pipeline.out_dir=runs/train-distributed \
		model/text=tiny train.max_steps=40 train.max_files=40 train.vocab_size=512 \
		train.seq_len=64 train.batch_size=16 train.trainer.warmup_steps=5 \
		train.trainer.eval_every=20 train.trainer.log_every=10 generation.max_new_tokens=24

# The suites run two at a time, each on one thread (TEST_ENV), so the 2 cores CI has are
# both busy; the longest (root) starts first, and each suite's output is printed whole
# when it ends.
TEST_SUITES := test-root $(addprefix test-,$(PACKAGES))
test: setup lint
	$(MAKE) --no-print-directory -j2 --output-sync=target $(TEST_SUITES)

lint: setup
	$(RUN) ruff check .
	$(RUN) ruff format --check .
	$(RUN) lint-imports

# One isolated venv per package under .venvs/<short>: `uv sync --package` installs the
# package, its declared dependencies and its own dev group (pytest, hypothesis), nothing
# else; check_isolation proves the other vats packages are absent before the tests run.
# tests/parallel runs in a process of its own: its 2-rank jobs fork the test process, and
# torch refuses to fork once earlier tests have started autograd's worker threads.
$(addprefix test-,$(PACKAGES)): test-%: uv
	UV_PROJECT_ENVIRONMENT=.venvs/$* $(UV) sync --locked --package vats-$* --quiet
	.venvs/$*/bin/python tools/check_isolation.py $(PKG_DIR_$*)
	$(TEST_ENV) .venvs/$*/bin/python -m pytest -c pyproject.toml -q $(PKG_DIR_$*)/tests \
		--ignore=$(PKG_DIR_$*)/tests/parallel $(PYTEST_ARGS)
	if [ -d $(PKG_DIR_$*)/tests/parallel ]; then $(TEST_ENV) .venvs/$*/bin/python -m pytest \
		-c pyproject.toml -q $(PKG_DIR_$*)/tests/parallel $(PYTEST_ARGS); fi

test-root: setup
	$(TEST_ENV) $(RUN) pytest -c pyproject.toml -q tests --ignore=tests/benchmarks $(PYTEST_ARGS)

# On a CUDA machine: every test marked gpu, then tests/benchmarks/bench_gpu.py (device,
# versions, peaks; attention TFLOP/s; LM tokens/s and MFU; decode tokens/s). Without CUDA
# it prints why it skipped and exits 0.
test-gpu: setup
	$(RUN) python tools/test_gpu.py $(PYTEST_ARGS)

bench: setup
	@for f in tests/benchmarks/bench_*.py; do $(RUN) python $$f; done

build: uv
	$(UV) build --all-packages --wheel --out-dir dist

clean:
	rm -rf .venvs dist outputs .pytest_cache .ruff_cache .hypothesis
