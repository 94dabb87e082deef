# The two commands of the README:
#   make book   set up .venv, execute every chapter at tiny scale, build the HTML book in _build/html
#   make test   set up .venv, run every test: unit + property tests, the book build (the one execution
#               of every chapter, checked cell by cell) and its pages in headless chromium
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export MINIPEFT_SCALE ?= tiny

.PHONY: setup book test lint bench clean chromium

# The browser test (tests/test_browser.py) drives Debian's chromium: installed here when
# missing and we are root on a Debian-like machine (CI); otherwise the test says why it skips.
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } || \
	  echo "chromium: not installed (not root or no apt-get); tests/test_browser.py will skip"

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: an open range would pull a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[book,dev,triton,full,lab]"
	touch $(STAMP)

# The project's Jupyter kernel, in the venv (not the user's folders): every chapter's kernelspec
# names it, so the book build (and with it make test) and JupyterLab run the chapters in this venv.
KERNEL := $(VENV)/share/jupyter/kernels/minipeft/kernel.json
$(KERNEL): $(STAMP)
	$(BIN)/python -m ipykernel install --sys-prefix --name minipeft --display-name "Python 3 (minipeft)"

setup: $(STAMP) $(KERNEL)

# MathJax for pages that render offline: a pinned npm tarball, checked, unpacked into _vendor/.
VENDOR := _vendor/vendored.json
$(VENDOR): scripts/vendor_assets.py | $(STAMP)
	$(BIN)/python scripts/vendor_assets.py

book: setup $(VENDOR)
	$(BIN)/jupyter-book build . --warningiserror --keep-going
	@echo "book: open _build/html/index.html"

test: setup chromium $(VENDOR)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests -p no:cacheprovider

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
