# The two Quickstart commands: `make run` (main job on the embedded simulator) and `make test`
# (the default suite: unit + ray tests, not slow or gpu). Both install what they need first.
VENV ?= .venv
PYTHON ?= python3
# CPU-only machines: the CPU wheel of torch. GPU machines: TORCH_SPEC="" keeps the CUDA torch you have.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install run test test-slow lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/pip install -q "$(TORCH_SPEC)"; fi
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

run: install
	$(BIN)/alpagym-ray train iterations=10

# pytest exits 5 when it collected nothing: that is not a failure of the suite
test: install
	$(BIN)/python -m pytest -m "not slow and not gpu" -q -p no:cacheprovider; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

test-slow: install
	$(BIN)/python -m pytest -m "slow" -q -p no:cacheprovider

lint: install
	$(BIN)/ruff check alpagym_ray envs learners rewards scripts tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs
