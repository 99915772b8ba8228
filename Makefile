# Two entry points for a fresh machine: `make demo` (the whole product, offline) and `make test`.
# Both create or reuse .venv and install the package with the CPU runtime; set EXTRAS=train,gpu,dev,ray
# on a CUDA machine (never install the cpu and gpu extras into one environment).
PYTHON ?= python3
VENV   ?= .venv
EXTRAS ?= train,cpu,dev,ray
BIN    := $(VENV)/bin
comma  := ,
STAMP  := $(VENV)/.installed-$(subst $(comma),_,$(EXTRAS))

.PHONY: install demo test test-all lint bench-train clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/python scripts/demo.py --out demo_out

test: install
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: install
	$(BIN)/ruff check .

test-all: install
	$(BIN)/python -m pytest -q tests

bench-train: install
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf demo_out runs .pytest_cache
