"""Wall-clock comparisons that hold on a noisy machine: the models run in turns, round after round, and each gets
the median of its rounds, so a slow moment hits one round of every model instead of all of one model's. Inference
(`forward_ms`, the latency tables of chapters 02-05) and training steps (`train_step_ms`: forward and backward, the
cost of a step that a method comparison reports).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn


def _interleaved(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median milliseconds of each call, the calls taking turns for `rounds` rounds after one warm-up each."""
    if rounds < 1:
        raise ValueError(f"timing needs at least one round, got rounds={rounds}")
    for call in calls.values():
        call()  # warm-up: first-call allocations and lazy initialisation
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


@torch.no_grad()
def forward_ms(models: dict[str, nn.Module], inputs: dict[str, torch.Tensor], rounds: int = 5) -> dict[str, float]:
    """Median milliseconds of one forward pass of each model on `inputs` (keyword arguments), without autograd."""
    for model in models.values():
        model.eval()
    return _interleaved({name: (lambda m=m: m(**inputs)) for name, m in models.items()}, rounds)


def train_step_ms(models: dict[str, nn.Module], inputs: dict[str, torch.Tensor], rounds: int = 5) -> dict[str, float]:
    """Median milliseconds of one training step's forward and backward pass (`inputs` carry the labels, the model
    returns `.loss`), for the parameters that require grad; gradients are cleared after each, weights never move."""

    def step(model: nn.Module) -> None:
        model.train()
        model(**inputs).loss.backward()
        model.zero_grad(set_to_none=True)

    return _interleaved({name: (lambda m=m: step(m)) for name, m in models.items()}, rounds)
