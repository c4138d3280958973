# `make demo`: set up .venv and run the main job; `make test`: set up .venv and run the tests.
# A re-run with a ready .venv skips what is installed and rebuilds only what changed.
PY := .venv/bin/python
CSRC := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: setup demo test bench lint gpu-check gpu-piad-compiled gpu-eager gpu-compiled-gradients
setup: .venv/.skd-deps .venv/.skd-ext

.venv/.skd-deps: pyproject.toml setup.py
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q setuptools wheel ninja
	SKD_SKIP_EXT=1 $(PY) -m pip install -q --no-build-isolation -e '.[dev]'
	touch $@

# The extension: ninja recompiles only the changed sources.
.venv/.skd-ext: .venv/.skd-deps $(CSRC)
	$(PY) setup.py -q build_ext --inplace
	touch $@

demo: setup
	$(PY) -m skd.cli demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m skd.cli bench

lint: setup
	.venv/bin/ruff check .

# The device check on a lent GPU machine, with that machine's own python and torch (no .venv there), one call
# of under 10 minutes (a lease is 15 in all): `make gpu-check GPU_PY=python3` from the repository root. Builds
# for the present GPU, runs the quick GPU tests, ElasticViT's latency, the profiler, the benchmark table and
# compute-sanitizer, into $OUT/gpu-check-report.md (and its junit XML beside it) when OUT is set, else into
# benchmarks/. benchmarks/gpu_check.py's docstring has the steps and their time limits.
GPU_PY ?= python3
GPU_REPORT ?= $(if $(OUT),$(OUT)/gpu-check-report.md,benchmarks/gpu-check-report.md)
gpu-check:
	$(GPU_PY) -m benchmarks.gpu_check --out $(GPU_REPORT)

# PIAD's compiled training step on a lent GPU, on its own: compiling ViT-S takes minutes there (161 s for two graphs
# on an H200 in session 15; one graph since), more than gpu-check has. Builds for the present GPU, then times eager
# and compiled steps at batch 256 beside the dense models of both widths (compiled too: two more graphs), and a
# profiled step's kernel time by kind of work, into $OUT/piad-compiled.md (else benchmarks/), with Dynamo's
# recompile reasons in piad-compiled.log (PIAD_MODEL=vit_base_patch16_224 for ViT-B). In fp32: compiled bf16
# autocast training gave wrong gradients on CUDA (session 18), and PIADTrainer and piad_step refuse it.
GPU_OUT ?= $(if $(OUT),$(OUT),benchmarks)
PIAD_MODEL ?= vit_small_patch16_224
# the extension built for the present GPU (incremental: quick after gpu-check on the same machine)
GPU_BUILD = MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=$$($(GPU_PY) -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") \
	$(GPU_PY) setup.py -q build_ext --inplace
gpu-piad-compiled:
	$(GPU_BUILD)
	TORCH_LOGS=recompiles $(GPU_PY) -m benchmarks.piad_step --device cuda --compile \
		--model $(PIAD_MODEL) --batch 256 --repeats 3 --kernels --dense > $(GPU_OUT)/piad-compiled.md 2> $(GPU_OUT)/piad-compiled.log

# Which compiler setting gives compiled bf16-autocast training wrong gradients on CUDA (session 18: 0.40 off eager's,
# so PIADTrainer refuses it): every variant of benchmarks/compiled_gradients.py in its own process, 6 at a time,
# into $OUT/compiled-gradients.md (else benchmarks/), rewritten as each ends.
gpu-compiled-gradients:
	$(GPU_BUILD)
	$(GPU_PY) -m benchmarks.compiled_gradients --device cuda --jobs 6 --timeout 240 \
		--out $(GPU_OUT)/compiled-gradients.md > $(GPU_OUT)/compiled-gradients.log 2>&1

# The eager no-grad forward on a lent GPU with and without session 16's below-autograd guard, beside the extracted
# model (ViT-S and ViT-B, batch 64, bf16; about a minute after the build), into $OUT/eager.md (else benchmarks/).
gpu-eager:
	$(GPU_BUILD)
	$(GPU_PY) -m benchmarks.below_autograd --device cuda --bf16 --batch 64 \
		--models vit_small_patch16_224 vit_base_patch16_224 > $(GPU_OUT)/eager.md 2>&1
