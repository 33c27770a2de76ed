# Two commands do everything on a fresh machine:  `make run` (smoke suite) and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# On the project's x86_64 CPU machines these wheels install from local files. GPU users with
# their own torch: `make run TORCH=` (empty) keeps whatever torch the venv already has.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data run test bench report galleries clean

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
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -n 2 --dist loadfile

bench: setup data
	$(PY) -m pytest tests/benchmarks --benchmark-only

report: setup
	$(PY) -m masking_bench report

# Mask galleries of every strategy on the first 8 test images (fresh seeded model; hidden patches
# opaque, score maps with colour bars). sbam_amr is drawn in the mode the committed study trains
# (mode=sample, suites/ratio_sweep.yaml); mto shows its attention rule next to the masks; misalign
# its up-sampled view. With CKPT=results/runs/<suite>/<hash>/checkpoint.pt the model-dependent
# strategies also get a gallery from that trained model (SBAM's salience after warm-up, MTO's
# decoder attention). Other data: `python -m masking_bench masks STRATEGY --suite SUITE.yaml`.
STRATS := random block coarse_random sbam sbam_amr mto misalign
galleries: setup data
	for s in $(STRATS); do $(PY) -m masking_bench masks $$s --ratio 0.75 --n 8 --out results/masks/$$s.png || exit 1; done
	[ -z "$(CKPT)" ] || for s in sbam sbam_amr mto; do \
	  $(PY) -m masking_bench masks $$s --ratio 0.75 --n 8 --checkpoint $(CKPT) --out results/masks/$${s}_trained.png || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
