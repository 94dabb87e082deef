"""Plots the chapters share: training curves, the quality-vs-parameters trade-off, and
stacked memory bars. Each returns the matplotlib Axes so a chapter can add to it."""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
from matplotlib.axes import Axes

from .train import History

KINDS_COLORS = {"weights": "#4C72B0", "gradients": "#DD8452", "optimizer": "#55A868", "activations": "#C44E52"}


def _axes(ax: Axes | None, size=(6, 3.5)) -> Axes:
    return ax if ax is not None else plt.subplots(figsize=size)[1]


def plot_histories(histories: Mapping[str, History], ax: Axes | None = None) -> Axes:
    """Eval accuracy against optimizer step, one line per run."""
    ax = _axes(ax)
    for name, h in histories.items():
        ax.plot(h.eval_steps, h.eval_accuracy, marker="o", label=name)
    ax.set(xlabel="optimizer step", ylabel="eval accuracy")
    ax.legend(fontsize=8)
    return ax


def plot_tradeoff(
    points: Mapping[str, tuple[int, float]], ax: Axes | None = None, baseline: float | None = None
) -> Axes:
    """Eval accuracy against trainable parameters (log scale): {name: (trainable, accuracy)}."""
    ax = _axes(ax)
    for name, (n, acc) in points.items():
        ax.scatter(n, acc, s=30)
        ax.annotate(name, (n, acc), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if baseline is not None:
        ax.axhline(baseline, color="grey", ls="--", lw=1, label="majority class")
        ax.legend(fontsize=8)
    ax.set(xscale="log", xlabel="trainable parameters", ylabel="eval accuracy")
    return ax


def plot_memory(
    rows: Mapping[str, Mapping[str, float]], unit: float = 2**30, unit_name: str = "GiB", ax: Axes | None = None
) -> Axes:
    """Stacked bars of bytes by kind (weights, gradients, optimizer, activations) per row."""
    ax = _axes(ax, (7, 3.5))
    names = list(rows)
    bottom = [0.0] * len(names)
    for kind, color in KINDS_COLORS.items():
        values = [rows[n].get(kind, 0) / unit for n in names]
        if any(values):
            ax.bar(names, values, bottom=bottom, color=color, label=kind)
            bottom = [b + v for b, v in zip(bottom, values, strict=False)]
    ax.set(ylabel=unit_name)
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelrotation=20)
    return ax
