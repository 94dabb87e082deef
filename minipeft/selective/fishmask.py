"""FishMask: train the k weight entries with the largest empirical Fisher information
(Sung, Nair and Raffel, 2021, "Training Neural Networks with Fixed Sparse Masks",
arXiv:2111.09839). Taught in chapter 06.

The Fisher information of entry i is estimated from a few batches of task data as

    F_i = mean over batches of (d loss / d theta_i)^2      (batches of one example: the per-example
                                                            empirical Fisher of the paper)

computed once on the base model; the mask is the global top-k of F and stays fixed while
the k values train. Usage:

    model = mp.get_peft_model(base, mp.FishMaskConfig(sparsity=0.005, modules_to_save=["score"]))
    mp.select_by_fisher(model, batches)   # until then the mask is random (the paper's baseline)
    train(model)                          # only the k values (and the head) train

The adapter file holds the k positions (int32) and values (4 bytes each in fp32): 8 bytes per entry.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import register
from ..core.layers import innermost
from .deltas import delta_layers
from .masks import SparseConfig, SparseDeltaLayer, SparseMethod, keep_top_k


@dataclass
class FishMaskConfig(SparseConfig):
    peft_type = "FISHMASK"


def fisher_scores(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], adapter_name: str | None = None
) -> dict[str, torch.Tensor]:
    """Mean squared gradient of the loss (`model(**batch).loss`) for each targeted base weight, on the base model
    (adapters disabled, dropout off). Returns {module name: scores in the weight's own layout}."""
    name = adapter_name or model.active_adapter
    weights = {n: innermost(layer).weight for n, layer in delta_layers(model.base_model.model, name).items()}
    sums = {n: torch.zeros_like(w) for n, w in weights.items()}
    modes, count = {m: m.training for m in model.modules()}, 0
    model.eval()
    for w in weights.values():
        w.requires_grad_(True)
    try:
        with model.disable_adapter():
            for batch in batches:
                grads = torch.autograd.grad(model(**batch).loss, list(weights.values()))
                for n, g in zip(weights, grads, strict=True):
                    sums[n] += g.pow(2)
                count += 1
    finally:
        for w in weights.values():
            w.requires_grad_(False)
        for m, mode in modes.items():
            m.train(mode)
    if count == 0:
        raise ValueError("select_by_fisher needs at least one batch of task data (dicts with input_ids and labels)")
    return {n: s / count for n, s in sums.items()}


def select_by_fisher(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]] | None = None,
    adapter_name: str | None = None,
    scores: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Replace the adapter's mask by the global top-k of the empirical Fisher; values restart at zero.
    `scores` reuses Fisher scores computed before (for another budget, say) instead of `batches`.
    Returns the scores (for plots). Build the optimizer after this call: the parameters are new."""
    name = adapter_name or model.active_adapter
    if not isinstance(model.peft_config.get(name), FishMaskConfig):
        raise ValueError(f"adapter {name!r} is not a FishMask adapter: {type(model.peft_config.get(name)).__name__}")
    if scores is None:
        if batches is None:
            raise ValueError("select_by_fisher needs batches of task data, or the scores of an earlier call")
        scores = fisher_scores(model, batches, name)
    keep_top_k(model, name, scores)
    return scores


FISHMASK = register(SparseMethod(FishMaskConfig, SparseDeltaLayer, default_roles=("linear",)))
