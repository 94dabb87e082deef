"""Precompute the seed grids the chapters show at `tiny` scale (minipeft/experiment.py says why).

Executes each chapter with MINIPEFT_SEEDS=0,...,4 and MINIPEFT_GRID=write: every `Experiment.run` trains all five
seeds and writes minipeft/assets/grids/<chapter>.csv (accuracy per seed, with the date, the machine and the setup the
run used). The chapter then trains seed 0 live at every build and checks it against the grid.

    python benchmarks/seed_grid.py chapters/03_adapters.ipynb [more chapters]
    SEEDS=0,1,2 python benchmarks/seed_grid.py chapters/12_synthesis.ipynb   # fewer seeds
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def main(paths: list[str]) -> None:
    if not paths:
        raise SystemExit(__doc__)
    os.environ.update(MINIPEFT_SEEDS=os.environ.get("SEEDS", "0,1,2,3,4"), MINIPEFT_GRID="write", MINIPEFT_SCALE="tiny")
    for path in map(Path, paths):
        start = time.perf_counter()
        nb = nbformat.read(path, as_version=4)
        NotebookClient(nb, timeout=None, resources={"metadata": {"path": str(path.parent)}}).execute()
        print(f"{path}: grid written in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
