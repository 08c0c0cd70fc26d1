# Every target sets itself up: `make test` and `make demo` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel on this kind of machine; GPU users override it with one pip requirement (it is passed quoted), e.g.
# TORCH_SPEC="torch==2.13.0+cu128" with PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu128 (README.md, Install).
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev
PYTEST_ARGS ?=

.PHONY: install install-bench install-deepspeed test test-slow quality style demo bench bench-steps bench-accuracy bench-accuracy-deep \
	bench-accuracy-deep8 bench-accuracy-qwen2vl bench-gpu clean
# Timings are only comparable one at a time: never run benchmark targets in parallel, even under `make -j`.
.NOTPARALLEL:

install: $(VENV)/.installed

# Torch goes in first: installing the package first would pull the newest torch with its CUDA packages.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[$(EXTRAS)]"
	touch $@

# The benchmark harness (benchmarks/, not part of the wheel) needs a few packages beyond the library's: plotting.
install-bench: $(VENV)/.installed-bench

$(VENV)/.installed-bench: $(VENV)/.installed benchmarks/requirements.txt
	$(BIN)/pip install --quiet --disable-pip-version-check -r benchmarks/requirements.txt
	touch $@

# The tests cover the harness too.
test: install-bench
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# The slow suite runs the two-process DeepSpeed tests on CPU: DeepSpeed's pure-Python build (no compiled ops) beside
# the installed torch, pinned to the version whose known issue the tests record (docs/scaling_out.md).
install-deepspeed: $(VENV)/.installed-deepspeed

$(VENV)/.installed-deepspeed: $(VENV)/.installed
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet --disable-pip-version-check --no-build-isolation "deepspeed==0.19.8"
	touch $@

test-slow: install-bench install-deepspeed
	$(BIN)/python -m pytest -m "slow" $(PYTEST_ARGS)

quality: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

style: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

demo: install-bench
	$(BIN)/python -m benchmarks.demo $(DEMO_ARGS)

# `bench` = the step-time benchmark, then the (long, see benchmarks/README.md) accuracy benchmarks.
bench: bench-steps bench-accuracy bench-accuracy-deep bench-accuracy-deep8 bench-accuracy-qwen2vl

bench-steps: install-bench
	$(BIN)/python -m benchmarks.bench_steps $(BENCH_ARGS)

bench-accuracy: install-bench
	$(BIN)/python -m benchmarks.bench_accuracy $(BENCH_ACCURACY_ARGS)

# The combined recipe (compression + DualSpeed + layer skipping) on a 4-layer decoder, and DualSpeed alone.
DEEP_RECIPES ?= baseline,dualspeed-divprune-0.1,dualspeed-divprune-0.1-slow0.05,sts-divprune-0.1-stochastic0.25-slow0.05,sts-divprune-0.1-stochastic0.5-slow0.05,sts-divprune-0.1-skip0.25-slowskip,sts-divprune-0.1-skip0.25,sts-divprune-0.05-stochastic0.25-slow0.05
bench-accuracy-deep: install-bench
	$(BIN)/python -m benchmarks.bench_accuracy --preset bench-deep --recipes $(DEEP_RECIPES) $(BENCH_ACCURACY_ARGS)

# The combined recipe on an 8-layer decoder, where the language model dominates the step.
DEEP8_RECIPES ?= baseline,sts-divprune-0.1-skip0.25-slowskip,sts-divprune-0.1-stochastic0.25-slow0.05,dualspeed-divprune-0.1-slow0.05
bench-accuracy-deep8: install-bench
	$(BIN)/python -m benchmarks.bench_accuracy --preset bench-deep8 --recipes $(DEEP8_RECIPES) $(BENCH_ACCURACY_ARGS)

# An M-RoPE model: a tiny Qwen2-VL, the stock Trainer against DualSpeed with DivPrune at keep_ratio 0.25.
QWEN2VL_RECIPES ?= baseline,dualspeed-divprune-0.25
bench-accuracy-qwen2vl: install-bench
	$(BIN)/python -m benchmarks.bench_accuracy --preset bench-qwen2vl --recipes $(QWEN2VL_RECIPES) $(BENCH_ACCURACY_ARGS)

# The GPU step benchmark at real widths (LLaVA-1.5-7B, LLaVA-NeXT-7B, Qwen2.5-VL-7B shapes) on one CUDA GPU, under
# 6 minutes on an H200; writes benchmarks/results/gpu.{json,md}. It imports only torch, transformers and the package:
# on a machine with its own torch and no network, `make bench-gpu BENCH_PYTHON=python3` uses that Python as it is.
# BENCH_GPU_ARGS=--smoke runs it at tiny widths on CPU.
BENCH_PYTHON ?=
BENCH_GPU_ARGS ?=
bench-gpu: $(if $(BENCH_PYTHON),,install)
	PYTHONPATH=. $(or $(BENCH_PYTHON),$(BIN)/python) -m benchmarks.bench_gpu $(BENCH_GPU_ARGS)

clean:
	rm -rf $(VENV) outputs build dist *.egg-info .pytest_cache .ruff_cache

# --- Evaluation ------------------------------------------------------------------------------------------------
.PHONY: eval install-lmms-eval

# Evaluate a saved model folder, e.g. make eval EVAL_ARGS="--model_path outputs/demo/sparse_model --modes full divprune@0.25"
# (the `hf-sparse-mllm eval` command, see docs/cli.md).
eval: install
	$(BIN)/python -m hf_sparse_mllm eval $(EVAL_ARGS)

# lmms-eval without its dependency list (its torchvision requirement would replace the CPU torch with a CUDA build):
# the package plus the modules it imports to run generate_until tasks on local data, all with --no-deps.
# LMMS_EVAL_TARGET=<dir> installs into that folder instead of the venv (then run with PYTHONPATH=<dir>).
LMMS_EVAL_SPEC ?= lmms-eval==0.7.3
# filelock<4.3: lmms-eval 0.7.3 imports `filelock._api`, which filelock 4.3 no longer has.
LMMS_EVAL_DEPS := loguru sacrebleu portalocker tabulate colorama lxml pytz tenacity pytablewriter DataProperty \
	mbstrdecoder pathvalidate tabledata tcolorpy typepy chardet "filelock<4.3"
LMMS_EVAL_TARGET ?=

install-lmms-eval: install
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps \
		$(if $(LMMS_EVAL_TARGET),--upgrade --target "$(LMMS_EVAL_TARGET)") "$(LMMS_EVAL_SPEC)" $(LMMS_EVAL_DEPS)
	$(if $(LMMS_EVAL_TARGET),PYTHONPATH="$(LMMS_EVAL_TARGET)") $(BIN)/python -c "import lmms_eval.evaluator, \
		lmms_eval.models, torch; from importlib.metadata import version; \
		print('lmms-eval', version('lmms-eval'), 'with torch', torch.__version__)"
