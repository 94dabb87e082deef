"""Wall-clock comparisons of inference that hold on a noisy machine: the models run in turns, round after round,
and each gets the median of its rounds, so a slow moment hits one round of every model instead of all of one
model's. Used by the latency tables of chapters 02-05.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


@torch.no_grad()
def forward_ms(models: dict[str, nn.Module], inputs: dict[str, torch.Tensor], rounds: int = 5) -> dict[str, float]:
    """Median milliseconds of one forward pass of each model on `inputs` (keyword arguments), without autograd."""
    if rounds < 1:
        raise ValueError(f"forward_ms needs at least one round, got rounds={rounds}")
    for model in models.values():
        model.eval()
        model(**inputs)  # warm-up: first-call allocations and lazy initialisation
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model(**inputs)
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}
