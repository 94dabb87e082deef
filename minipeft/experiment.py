"""Comparisons a reader can trust: each method over several seeds, a mean with a 95% confidence interval, and a
learning rate per method from one documented sweep. Chapters 01 and 07 compare methods through it (chapter 07 teaches
the comparisons; book/how_to_read.md explains them to readers).

Why: one run of 40 steps scored on 326 examples moves by several points from seed to seed, so a single run cannot
rank two methods. And one learning rate for all leaves some methods at their initialisation: soft prompts, (IA)^3
and VeRA need rates one to two orders of magnitude above LoRA's (Lester et al. 2021; Liu et al. 2022; Kopiczko et
al. 2024). `LEARNING_RATES` holds the rate per method that `benchmarks/sweep_lr.py` chose on the testbed (its result
ships as `benchmarks/results/lr_sweep.csv`, with date and machine; a test holds the two equal).

Seeds at `tiny` scale: a chapter trains seed 0 live and shows the spread of a grid of seeds that
`benchmarks/seed_grid.py` precomputed by running the same notebook with MINIPEFT_SEEDS=0,...,4 and
MINIPEFT_GRID=write (shipped in `minipeft/assets/grids/<chapter>.csv`). A run whose setup differs from the grid's
is refused, and the live run must fall inside the grid's spread (within `TOLERANCE`), so the grid cannot drift
from the code that made it. At `full` scale (a GPU) every seed runs live. MINIPEFT_SEEDS overrides the seeds at
either scale.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .core.config import PeftConfig
from .data import scale
from .train import History

# Learning rates per method (peft_type; "FULL" full fine-tuning, "PROBE" the head alone), AdamW, batch 32, 40 steps
# on the testbed: the best mean accuracy over two seeds among 1e-3 ... 1e-1 (full fine-tuning: 1e-4 ... 3e-3).
# The sweep's means (benchmarks/results/lr_sweep.csv) put LoRA's best at 3e-3 and (IA)^3's at 3e-2; at 40 steps
# prompt tuning, prefix tuning, VeRA and BitFit stay within 2 points of the probe (0.465) at every rate, P-tuning
# below it.
LEARNING_RATES: dict[str, float] = {
    "LORA": 3e-3,  # DoRA, rsLoRA and PiSSA are LoRA configs: the same rate
    "ADALORA": 1e-2,
    "VERA": 1e-2,
    "LOHA": 1e-2,
    "LOKR": 1e-2,
    "INTRINSIC": 3e-3,
    "ADAPTER": 1e-2,
    "PARALLEL_ADAPTER": 1e-2,
    "COMPACTER": 1e-2,
    "PROMPT_TUNING": 1e-2,
    "P_TUNING": 1e-2,
    "PREFIX_TUNING": 3e-3,
    "IA3": 3e-2,
    "BITFIT": 1e-2,
    "LN_TUNING": 1e-2,
    "PARTIAL": 3e-3,
    "FISHMASK": 1e-2,
    "MAM": 3e-3,
    "UNIPELT": 1e-2,
    "FULL": 1e-3,
    "PROBE": 1e-2,
}
# Methods the sweep does not run, and whose rate they share: diff pruning trains the same sparse delta as FishMask
# once its mask is fixed (its gates have their own rate, chapter 06).
ALIASES = {"DIFF_PRUNING": "FISHMASK"}
# How far a live run may fall outside the shipped grid's spread over seeds: 2 points (7 of 326 examples), for the
# float differences between CPUs (the same seed on the same machine reproduces its grid row exactly).
TOLERANCE = 0.02
GRID_DIR = Path(__file__).parent / "assets" / "grids"
# Two-sided 95% quantiles of Student's t with df = 1, 2, ... (the interval of a mean over df + 1 seeds).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def learning_rate(method: PeftConfig | str | None) -> float:
    """The learning rate of a method: a config, its peft_type, "FULL" (None too) or "PROBE"."""
    key = "FULL" if method is None else method if isinstance(method, str) else method.peft_type
    key = ALIASES.get(key, key)
    if key not in LEARNING_RATES:
        raise KeyError(f"no learning rate for {key!r}; known: {sorted(LEARNING_RATES)} (benchmarks/sweep_lr.py)")
    return LEARNING_RATES[key]


def full_fine_tuning(model: nn.Module, embeddings: bool = False) -> nn.Module:
    """Make every weight of `model` trainable, but the token and position embeddings unless `embeddings`: full
    fine-tuning of the weights the PEFT methods adapt (they never train the embeddings)."""
    emb = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(embeddings or id(p) not in emb)
    return model


def linear_probe(model: nn.Module, head: str = "score") -> nn.Module:
    """Train the classification head alone: the floor every method must clear."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.split(".")[0] == head)
    return model


def t_critical(df: int) -> float:
    """The two-sided 95% quantile of Student's t with `df` degrees of freedom (1.96 in the limit)."""
    if df < 1:
        raise ValueError(f"a confidence interval needs at least two seeds (df >= 1), got df={df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = 1.959964  # beyond the table, the Cornish-Fisher expansion in 1/df: within 0.003 of the exact value
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass
class Result:
    """One method over seeds: accuracies in seed order, the live run's history (seed `seeds[0]`, for curves)."""

    name: str
    seeds: list[int]
    accuracy: list[float]
    trainable: int
    history: History | None = None
    live: float | None = None  # the accuracy trained in this session (tiny: seed 0; the rest come from the grid)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracy)

    @property
    def half_width(self) -> float:
        """Half the 95% confidence interval of the mean: t * s / sqrt(n); 0 for a single seed."""
        n = len(self.accuracy)
        return 0.0 if n < 2 else t_critical(n - 1) * statistics.stdev(self.accuracy) / math.sqrt(n)

    @property
    def interval(self) -> tuple[float, float]:
        return self.mean - self.half_width, self.mean + self.half_width

    def __str__(self) -> str:  # percent, one decimal
        return f"{100 * self.mean:.1f} ± {100 * self.half_width:.1f}"


def _seeds() -> tuple[int, ...]:
    text = os.environ.get("MINIPEFT_SEEDS")
    if text:
        try:
            return tuple(int(s) for s in text.split(","))
        except ValueError:
            raise ValueError(f"MINIPEFT_SEEDS must be integers separated by commas, got {text!r}") from None
    return (0,) if scale() == "tiny" else (0, 1, 2)


def machine() -> str:
    """Where a grid was computed: CPU architecture, cores, torch threads."""
    return f"{platform.machine()} {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


@dataclass
class Experiment:
    """The method comparisons of one chapter: `run` each method, then `table()` and `results` for plots."""

    chapter: str  # names the grid file: minipeft/assets/grids/<chapter>.csv
    metric: str = "accuracy"  # what a run returns (History.accuracy, or the float `train` returns): the table's name
    results: dict[str, Result] = field(default_factory=dict)
    seeds: tuple[int, ...] = field(default_factory=_seeds)
    # "write": record every run into the grid (benchmarks/seed_grid.py); "read": tiny scale, a grid exists.
    mode: str = field(default_factory=lambda: os.environ.get("MINIPEFT_GRID", "read" if scale() == "tiny" else "live"))
    grid_dir: Path = field(default_factory=lambda: Path(os.environ.get("MINIPEFT_GRID_DIR", GRID_DIR)))

    def __post_init__(self) -> None:
        if self.mode not in ("read", "write", "live"):
            raise ValueError(f"MINIPEFT_GRID must be 'read', 'write' or 'live', got {self.mode!r}")
        self.path = self.grid_dir / f"{self.chapter}.csv"
        self.grid = self._read() if self.mode == "read" else {}  # "write" starts a new grid

    def _read(self) -> dict[str, list[dict]]:
        rows: dict[str, list[dict]] = {}
        if self.path.exists():
            with open(self.path, newline="") as f:
                for row in csv.DictReader(f):
                    rows.setdefault(row["name"], []).append(row)
        return rows

    def run(self, name: str, train: Callable[[int], History | float], trainable: int | None = None, **setup) -> Result:
        """Run `train(seed)` (it seeds, builds, trains and returns the History, or an accuracy) for the live seeds.
        `setup` (learning rate, steps, ...) is what the grid must have been computed with."""
        if name in self.results:
            raise ValueError(f"{self.chapter}: a run named {name!r} exists already; give each run its own name")
        setup = json.loads(json.dumps(setup, sort_keys=True, default=str))
        runs = {}
        for seed in self.seeds:
            torch.manual_seed(seed)
            runs[seed] = train(seed)
        first = runs[self.seeds[0]]
        history = first if isinstance(first, History) else None
        accuracy = {s: r.accuracy if isinstance(r, History) else float(r) for s, r in runs.items()}
        count = history.trainable if trainable is None and history is not None else int(trainable or 0)
        result = Result(
            name, list(self.seeds), [accuracy[s] for s in self.seeds], count, history, accuracy[self.seeds[0]]
        )
        if self.mode == "read":
            result = self._from_grid(result, setup)
        elif self.mode == "write":
            self.grid[name] = [
                {"name": name, "seed": s, "accuracy": f"{accuracy[s]:.6f}", "trainable": count,
                 "setup": json.dumps(setup, sort_keys=True), "date": datetime.date.today().isoformat(),
                 "machine": machine(), "torch": torch.__version__}
                for s in self.seeds
            ]  # fmt: skip
            self._write()
        self.results[name] = result
        return result

    def _from_grid(self, live: Result, setup: dict) -> Result:
        rows = self.grid.get(live.name)
        redo = f"regenerate it: python benchmarks/seed_grid.py chapters/{self.chapter}.ipynb"
        if not rows:
            raise LookupError(f"{self.path} has no run {live.name!r}; {redo}")
        if json.loads(rows[0]["setup"]) != setup or int(rows[0]["trainable"]) != live.trainable:
            raise LookupError(
                f"{self.path}: run {live.name!r} was computed with {rows[0]['setup']} and {rows[0]['trainable']} "
                f"trainable parameters, the chapter now runs {json.dumps(setup, sort_keys=True)} and "
                f"{live.trainable}; {redo}"
            )
        seeds = [int(r["seed"]) for r in rows]
        return Result(live.name, seeds, [float(r["accuracy"]) for r in rows], live.trainable, live.history, live.live)

    def _write(self) -> None:
        self.grid_dir.mkdir(parents=True, exist_ok=True)
        fields = ["name", "seed", "accuracy", "trainable", "setup", "date", "machine", "torch"]
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for rows in self.grid.values():
                writer.writerows(rows)
        os.replace(tmp, self.path)  # atomic: a grid is whole or untouched

    def mismatches(self, tolerance: float = TOLERANCE) -> dict[str, tuple[float, float, float]]:
        """Runs whose live accuracy falls outside the grid's spread over seeds, widened by `tolerance` on each side
        (float results differ a little between CPUs): {name: (live, grid min, grid max)}."""
        out = {}
        for name, r in self.results.items():
            low, high = min(r.accuracy), max(r.accuracy)
            if r.live is not None and not low - tolerance <= r.live <= high + tolerance:
                out[name] = (r.live, low, high)
        return out

    def table(self, names: list[str] | None = None):
        """A pandas DataFrame: trainable parameters, the metric as mean ± 95% CI in percent, seeds, low and high."""
        import pandas as pd

        rows = {}
        for name in names or list(self.results):
            r = self.results[name]
            low, high = r.interval
            rows[name] = {"trainable": f"{r.trainable:,}", f"{self.metric} % (95% CI)": str(r), "seeds": len(r.seeds),
                          "low %": round(100 * low, 1), "high %": round(100 * high, 1)}  # fmt: skip
        return pd.DataFrame(rows).T
