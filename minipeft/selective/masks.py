"""Sparse masks, shared by FishMask and diff pruning (chapter 06).

Both train a budget of exactly k = round(sparsity * N) entries of the N targeted weight
entries, chosen *globally* (a layer may get many or none) by a score: the empirical Fisher
information for FishMask (Sung et al., 2021, arXiv:2111.09839), the magnitude of the learned
diff for diff pruning (Guo et al., 2021, arXiv:2012.07463). The choice is stored as
positions + values (`SparseDelta`), and the config records how many entries each module got,
so that a saved adapter rebuilds the same shapes when it is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import Method, PeftConfig
from ..core.layers import innermost
from ..core.targets import LINEAR_TYPES
from .deltas import DeltaLayer, SparseDelta, delta_layers


@dataclass
class SparseConfig(PeftConfig):
    # Fraction of the targeted weight entries allowed to change, in (0, 1]: the budget is exactly
    # k = round(sparsity * N). Guo et al. call it the sparsity rate; 0.005 (0.5%) is their GLUE setting.
    sparsity: float = 0.005
    # Written by the selection (FishMask) or the projection (diff pruning): entries kept per module,
    # so that loading rebuilds the same shapes (as AdaLoRA's rank_pattern does). None: not chosen yet.
    selected_counts: dict[str, int] | None = None
    # True: the kept values start at zero (the base model); False: random (tests need a non-zero update).
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.sparsity <= 1.0:
            raise ValueError(
                f"{type(self).__name__}.sparsity is the fraction of entries that may change and must be in "
                f"(0, 1], e.g. 0.005 for 0.5%; got {self.sparsity}"
            )

    def budget(self, total: int) -> int:
        """k = round(sparsity * total), refused if it keeps no entry at all."""
        k = round(self.sparsity * total)
        if k < 1:
            raise ValueError(
                f"sparsity={self.sparsity} of {total:,} targeted entries keeps no entry; "
                f"use sparsity >= {1 / total:.2g}"
            )
        return k


def proportional_counts(sizes: dict[str, int], k: int) -> dict[str, int]:
    """Split k over modules in proportion to their sizes; largest remainders, so the counts sum to k."""
    total = sum(sizes.values())
    exact = {n: k * s / total for n, s in sizes.items()}
    counts = {n: int(v) for n, v in exact.items()}
    for n in sorted(exact, key=lambda n: exact[n] - counts[n], reverse=True)[: k - sum(counts.values())]:
        counts[n] += 1
    return counts


class SparseDeltaLayer(DeltaLayer):
    """A weight matrix with k trained entries per adapter; `SparseMethod.link` chooses where."""

    base_types = LINEAR_TYPES

    def new_entries(self, config: SparseConfig) -> dict[str, nn.Module]:
        weight = innermost(self).weight
        return {"weight": SparseDelta(weight, torch.zeros(0, dtype=torch.long), config.init_weights)}


def place(layers: dict[str, DeltaLayer], adapter_name: str, positions: dict[str, torch.Tensor],
          values: dict[str, torch.Tensor] | None = None, init_weights: bool = True) -> dict[str, int]:  # fmt: skip
    """Make each layer's entry a SparseDelta at its `positions` (flat, in the weight's own layout), holding
    `values` there (else zeros, or random with init_weights=False). Returns the count per module."""
    for name, layer in layers.items():
        weight = innermost(layer).weight
        entry = SparseDelta(weight, positions[name], init_weights).train(layer.training)
        if values is not None:
            with torch.no_grad():
                entry.values.copy_(values[name].reshape(-1)[positions[name]])
        layer.selective_delta[adapter_name]["weight"] = entry
    return {name: len(p) for name, p in positions.items()}


class SparseMethod(Method):
    """Every linear of the blocks by default; one budget of k entries over all of them."""

    def resolve(self, model: nn.Module, config: SparseConfig) -> SparseConfig:
        names = self.targets(model, config)
        weights = [getattr(innermost(model.get_submodule(n)), "weight", None) for n in names]
        config.budget(sum(w.numel() for w in weights if isinstance(w, torch.Tensor)))  # refuse k = 0 now
        counts = config.selected_counts
        if counts is not None and set(counts) != set(names):
            raise ValueError(
                f"the adapter's selected_counts name modules {sorted(set(counts) ^ set(names))[:5]} that this model "
                "does not target the same way; was it saved from another architecture?"
            )
        return config

    def link(self, model: nn.Module, config: SparseConfig, adapter_name: str, layers: dict[str, nn.Module]) -> None:
        """The recorded counts per module, or (not chosen yet) counts in proportion to module size; at random
        positions until a selection (or a loaded file) replaces them: a random mask, the papers' baseline."""
        sizes = {n: innermost(layer).weight.numel() for n, layer in layers.items()}
        counts = config.selected_counts or proportional_counts(sizes, config.budget(sum(sizes.values())))
        gen = torch.Generator().manual_seed(0)
        positions = {n: torch.randperm(sizes[n], generator=gen)[: counts[n]].sort().values for n in layers}
        place(layers, adapter_name, positions, init_weights=config.init_weights)


@torch.no_grad()
def keep_top_k(
    model: nn.Module, adapter_name: str, scores: dict[str, torch.Tensor], values: dict[str, torch.Tensor] | None = None
) -> None:
    """Keep the config's budget of k entries with the highest scores over all modules together; each module's
    entry becomes a SparseDelta at those positions, holding `values` there (zeros if None).

    `model` is the PeftModel; scores and values are in each base weight's own layout."""
    config = model.peft_config[adapter_name]
    layers = delta_layers(model.base_model.model, adapter_name)
    flat = torch.cat([scores[n].reshape(-1).float() for n in layers])  # (N,)
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[torch.topk(flat, config.budget(flat.numel())).indices] = True
    positions, start = {}, 0
    for name, layer in layers.items():
        size = innermost(layer).weight.numel()
        positions[name] = chosen[start : start + size].nonzero().squeeze(1)  # (k_module,)
        start += size
    config.selected_counts = place(layers, adapter_name, positions, values)
    model.set_adapter(model.active_adapters)  # the new values are what trains
