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
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[book,dev,triton,full,lab]"
	touch $(STAMP)

# The project's Jupyter kernel, in the venv (not the user's folders): every chapter's kernelspec
# names it, so nbval, the book build and JupyterLab all run the chapters in this venv.
KERNEL := $(VENV)/share/jupyter/kernels/minipeft/kernel.json
$(KERNEL): $(STAMP)
	$(BIN)/python -m ipykernel install --sys-prefix --name minipeft --display-name "Python 3 (minipeft)"

setup: $(STAMP) $(KERNEL)

book: setup
	$(BIN)/jupyter-book build . --warningiserror --keep-going
	@echo "book: open _build/html/index.html"

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests chapters --nbval-lax -p no:cacheprovider

# The local reading room: JupyterLab on chapters/ with the project's kernel and live widgets.
# Kernels inherit MINIPEFT_SCALE; at full scale the hub stays reachable. As root (a container, CI)
# JupyterLab refuses to start without --allow-root. Extra options: LAB_ARGS=...
.PHONY: lab
lab: setup
	$(if $(filter full,$(MINIPEFT_SCALE)),env -u HF_HUB_OFFLINE) $(BIN)/jupyter lab --ServerApp.root_dir=chapters \
	  $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

bench: setup
	$(BIN)/python benchmarks/bench_lora.py
	$(BIN)/python benchmarks/bench_kernels.py

clean:
	rm -rf _build
