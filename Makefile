# Two entry points for a fresh machine (see README.md):
#   make demo   set up .venv and run the embedded default job (CPU, 2 processes)
#   make test   set up .venv and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= test,deepspeed,megatron
# Optional: a PyTorch wheel index for machines where plain `pip install torch==2.13.0` would take a CUDA build.
TORCH_INDEX ?=
# The exact versions tested (pyproject.toml has the supported ranges): frameworks.txt, and every other package.
CONSTRAINTS ?= constraints/environment.txt
PY := $(VENV)/bin/python
export DS_BUILD_OPS ?= 0
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: setup demo test test-fast clean system-deps megatron-0.19.2 gpu-check

# torch first and alone, at the tested version (from frameworks.txt: on this project's machines a CPU wheel),
# so that pyproject's torch range is already met when the package and its extras resolve.
$(VENV)/.installed-$(EXTRAS): pyproject.toml constraints/frameworks.txt $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints/frameworks.txt torch $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[$(EXTRAS)]'
	touch $@

# megatron-core 0.19.2 (the one with Megatron-LM's training loop) ships only a cp312 wheel; the
# 0.19.2 tests put this unpacked copy first on their workers' sys.path (tests/test_megatron_0192.py).
# Byte-compiled once here, as pip compiles what it installs: where PYTHONDONTWRITEBYTECODE is set, every
# process would otherwise compile every megatron module it imports (1.2 CPU-s per process, measured).
MEGATRON_0192 := .megatron-0.19.2
$(MEGATRON_0192)/.unpacked: | $(VENV)/.installed-$(EXTRAS)
	rm -rf $(MEGATRON_0192) && mkdir -p $(MEGATRON_0192)/.wheel
	$(PY) -m pip download -q megatron-core==0.19.2 --python-version 3.12 --only-binary=:all: --no-deps -d $(MEGATRON_0192)/.wheel
	$(PY) -m zipfile -e $(MEGATRON_0192)/.wheel/megatron_core-0.19.2-*.whl $(MEGATRON_0192)
	rm -rf $(MEGATRON_0192)/.wheel
	$(PY) -m compileall -q -j 0 $(MEGATRON_0192)/megatron >/dev/null  # as pip would: no process compiles it again
	touch $@

megatron-0.19.2: $(MEGATRON_0192)/.unpacked

setup: $(VENV)/.installed-$(EXTRAS) $(MEGATRON_0192)/.unpacked

demo: setup
	$(VENV)/bin/excitation-dist demo

# The project's own modules byte-compiled first (every rank and launcher process imports them; see megatron-0.19.2)
COMPILE := $(PY) -m compileall -q -j 0 excitation_dist patches tests >/dev/null

# Two pytest-xdist workers by default (TEST_WORKERS=0: one process): most tests launch multi-process runs, and a
# second worker fills the cores while the other's runs import or wait (tests/conftest.py says how files are split).
TEST_WORKERS ?= 2
XDIST = $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

test: setup
	$(COMPILE)
	$(PY) -m pytest $(XDIST)

# The inner loop (a few minutes): the unit tests, and one 2-rank case per backend. `make test` stays the whole suite.
FAST_TESTS := tests/test_strategies.py tests/test_config.py tests/test_segments.py tests/test_blend.py tests/test_rows.py \
	tests/test_core_controller.py tests/test_core_equivalence.py tests/test_step_order.py tests/test_step_ops.py \
	tests/test_dispatch_counter.py tests/test_torch_counting.py tests/test_recipe_config.py tests/test_router_options.py \
	tests/test_run_directories.py tests/test_checkpoint.py \
	tests/test_torch_distributed.py::test_one_collective_per_step_in_the_optimizer_step \
	"tests/test_deepspeed_backend.py::test_deepspeed_two_ranks[auto]" \
	"tests/test_megatron_backend.py::test_megatron_two_ranks[auto]"

test-fast: setup
	$(COMPILE)
	$(PY) -m pytest -q $(XDIST) $(FAST_TESTS)

# On a CUDA machine: no host syncs in Excitation's step path (sync debug mode "error"), step-time ratio and
# max_memory_allocated with/without (torch backend, DeepSpeed if importable); writes results/gpu_check.md.
# Without a GPU it says so and exits 3 (not a pass).
gpu-check: setup
	$(PY) benchmarks/gpu_check.py

# Debian packages for the launch tests (a local SLURM, network namespaces); root only.
system-deps:
	command -v sbatch >/dev/null && command -v munged >/dev/null && command -v ip >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge iproute2 >/dev/null; }

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info $(MEGATRON_0192)
