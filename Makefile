# The two commands of the README:
#   make book   set up .venv, execute every chapter at tiny scale, build the HTML book in _build/html
#   make test   set up .venv, run every test: unit + property tests, every chapter under nbval,
#               and a check that the book builds without warnings
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export MINIPEFT_SCALE ?= tiny

.PHONY: setup book test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: an open range would pull a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[book,dev,triton,full]"
	touch $(STAMP)

setup: $(STAMP)

book: setup
	$(BIN)/jupyter-book build . --warningiserror --keep-going
	@echo "book: open _build/html/index.html"

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests chapters --nbval-lax -p no:cacheprovider

bench: setup
	$(BIN)/python benchmarks/bench_lora.py
	$(BIN)/python benchmarks/bench_kernels.py

clean:
	rm -rf _build
