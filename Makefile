# Two commands on a fresh machine:
#   make demo   -> creates .venv, installs the package (no extras), runs `cft demo` (shortcut model + guided
#                  fine-tuning, CPU)
#   make test   -> creates .venv, installs everything (with test extras), runs the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision are pinned here (not in pyproject) because this workplace has these wheels on disk;
# elsewhere any torch>=2.2 works: override with `make TORCH_SPEC="torch torchvision" test`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv install demo smoke test lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# the package and its core dependencies: all `make demo` needs
$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e .
	touch $@

# + every extra and the test tools
$(VENV)/.installed: $(VENV)/.core
	$(BIN)/pip install -q -e ".[test]"
	touch $@

venv install: $(VENV)/.installed

demo: $(VENV)/.core
	WANDB_MODE=disabled $(BIN)/cft demo --out runs/demo

smoke: $(VENV)/.installed
	WANDB_MODE=disabled $(BIN)/python -m cft_lightning.smoke_data runs/smoke_data
	WANDB_MODE=disabled $(BIN)/cft fit --config configs/smoke.yaml
	WANDB_MODE=disabled $(BIN)/cft test --config configs/smoke.yaml --ckpt_path last

test: $(VENV)/.installed
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -x tests

lint: $(VENV)/.installed
	$(BIN)/ruff check cft_lightning tests perf

clean:
	rm -rf runs .pytest_cache
