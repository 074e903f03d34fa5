# Two commands do everything on a fresh Debian machine with Python 3.11:
#   make demo   install into .venv/, then run the whole chain on a generated ImageNet-layout dataset (CPU)
#   make test   install into .venv/, then run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := docker/lock/cpu.txt
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | sha256sum | cut -c1-12)
PIP := $(BIN)/pip install --quiet --disable-pip-version-check

.PHONY: install demo test clean-demo gpu-wheels lock image pin-bases sqsh sif

# The same hash-locked package set as the CPU image (docker/lock/cpu.txt, made by `make lock`): everything but
# DeepSpeed with its hashes required and nothing resolved, then DeepSpeed, whose build imports that torch
# (without build isolation, which would pull a second one), then pixelgen itself, editable.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PY) docker/lock.py --split $(LOCK) $(VENV)/lock
	$(PIP) --require-hashes --no-deps -r $(VENV)/lock/first.txt
	$(PIP) --require-hashes --no-deps --no-build-isolation -r $(VENV)/lock/deepspeed.txt
	$(PIP) --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/pixelgen fake-imagenet runs/fake-imagenet
	$(BIN)/pixelgen run configs/demo.yaml

# Two workers (pytest-xdist), whole files each, longest first (tests/conftest.py); TEST_WORKERS=0 runs serially.
# The 15 slowest tests are listed at the end: the CI log shows where its time budget goes.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest --durations=15 $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

clean-demo:
	rm -rf runs/demo runs/fake-imagenet

# The lock (docker/lock.py): regenerate after changing pyproject.toml's dependencies; UPGRADE=1 for the newest.
lock: install
	$(BIN)/python docker/lock.py $(if $(UPGRADE),--upgrade)

# The image (docker/build-image): LOCK_KIND=cpu|cuda, BASE= to override docker/bases.env, IMAGE= the tag.
LOCK_KIND ?= cpu
image:
	docker/build-image --lock $(LOCK_KIND) $(if $(BASE),--base $(BASE)) $(if $(IMAGE),--tag $(IMAGE))

pin-bases:
	docker/convert pin-bases

# For pyxis/enroot and Apptainer (docker/convert): IMAGE= the tag `make image` printed, OUT= the file.
sqsh:
	docker/convert sqsh $(IMAGE) $(or $(OUT),pixelgen.sqsh)

sif:
	docker/convert sif $(IMAGE) $(or $(OUT),pixelgen.sif)

# What benchmarks/gpu.py needs on the GPU machine beyond its own packages (it has Python 3.12 and torch, and
# reaches no registry), as wheels in .whl/ that travel with the working tree (docs/benchmarks.md, "One GPU").
GPU_PY ?= 3.12
GPU_PURE := deepspeed hjson omegaconf pydantic annotated-types typing-inspection typing-extensions
gpu-wheels: install
	rm -rf .whl && mkdir -p .whl
	$(BIN)/python docker/lock.py --pins $(LOCK) > .whl/pins.txt
	$(BIN)/pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation -c .whl/pins.txt \
		-w .whl $(GPU_PURE)
	$(BIN)/pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -c .whl/pins.txt \
		--python-version $(GPU_PY) --implementation cp --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl pydantic-core
	ls -l .whl
