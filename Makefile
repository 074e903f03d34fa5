# Two commands do everything on a fresh Debian machine with Python 3.11:
#   make demo   install into .venv/, then run the whole chain on a generated ImageNet-layout dataset (CPU)
#   make test   install into .venv/, then run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-12)
PIP := $(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: install demo test clean-demo gpu-wheels

# torch and torchvision first, as a matched pair from the registry (the local CPU-only torch wheel has no
# matching torchvision); then DeepSpeed without build isolation so its build uses that torch instead of
# pulling a second one; then the package and the rest, all pinned by constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) torch torchvision
	$(PIP) --no-build-isolation deepspeed
	$(PIP) -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/pixelgen fake-imagenet runs/fake-imagenet
	$(BIN)/pixelgen run configs/demo.yaml

test: install
	$(BIN)/python -m pytest

clean-demo:
	rm -rf runs/demo runs/fake-imagenet

# What benchmarks/gpu.py needs on the GPU machine beyond its own packages (it has Python 3.12 and torch, and
# reaches no registry), as wheels in .whl/ that travel with the working tree (docs/benchmarks.md, "One GPU").
GPU_PY ?= 3.12
GPU_PURE := deepspeed hjson omegaconf pydantic annotated-types typing-inspection typing-extensions
gpu-wheels: install
	rm -rf .whl && mkdir -p .whl
	$(BIN)/pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation -c constraints.txt \
		-w .whl $(GPU_PURE)
	$(BIN)/pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -c constraints.txt \
		--python-version $(GPU_PY) --implementation cp --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl pydantic-core
	ls -l .whl
