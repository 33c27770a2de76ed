# Two commands do everything on a fresh machine:  `make run` (smoke suite) and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# On the project's x86_64 CPU machines these wheels install from local files. GPU users with
# their own torch: `make run TORCH=` (empty) keeps whatever torch the venv already has.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data run test bench report clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	[ -z "$(TORCH)" ] || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

data:
	@if [ -z "$$MASKING_BENCH_DATA_DIR" ] && [ ! -f $(FMNIST) ]; then \
	  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	  $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist; fi

run: setup data
	$(PY) -m masking_bench run suites/smoke.yaml

test: setup data
	$(PY) -m pytest -q

bench: setup data
	$(PY) -m pytest tests/benchmarks --benchmark-only

report: setup
	$(PY) -m masking_bench report

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
