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

from ..core.config import PeftConfig
from ..core.layers import innermost
from ..core.targets import find_targets
from .deltas import SparseDelta, add_deltas, delta_layers

# Weight matrices a mask targets by default: every linear of the transformer blocks.
DEFAULT_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "bert": ["query", "key", "value", "dense"],
}


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


def targeted_weights(model: nn.Module, config: SparseConfig) -> dict[str, torch.Tensor]:
    """{module name: its base weight matrix} for the modules the config targets."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    out = {}
    for name in find_targets(model, config.target_modules, DEFAULT_TARGETS.get(model_type)):
        weight = getattr(innermost(model.get_submodule(name)), "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(
                f"{type(config).__name__} masks weight matrices; {name!r} is a "
                f"{type(model.get_submodule(name)).__name__} without one. Target linear layers, e.g. "
                f"{DEFAULT_TARGETS.get(model_type, ['c_attn', 'q_proj'])}"
            )
        out[name] = weight
    return out


def proportional_counts(sizes: dict[str, int], k: int) -> dict[str, int]:
    """Split k over modules in proportion to their sizes; largest remainders, so the counts sum to k."""
    total = sum(sizes.values())
    exact = {n: k * s / total for n, s in sizes.items()}
    counts = {n: int(v) for n, v in exact.items()}
    for n in sorted(exact, key=lambda n: exact[n] - counts[n], reverse=True)[: k - sum(counts.values())]:
        counts[n] += 1
    return counts


def inject_sparse(model: nn.Module, config: SparseConfig, adapter_name: str) -> None:
    """SparseDelta entries with the recorded counts per module, or (not chosen yet) counts in proportion to
    module size at random positions: a random mask, until a selection replaces it."""
    weights = targeted_weights(model, config)
    counts = config.selected_counts
    if counts is None:
        counts = proportional_counts(
            {n: w.numel() for n, w in weights.items()}, config.budget(sum(w.numel() for w in weights.values()))
        )
    elif set(counts) != set(weights):
        raise ValueError(
            f"the adapter's selected_counts name modules {sorted(set(counts) ^ set(weights))[:5]} that this model "
            "does not target the same way; was it saved from another architecture?"
        )
    gen = torch.Generator().manual_seed(0)
    entries = {}
    for name, weight in weights.items():
        positions = torch.randperm(weight.numel(), generator=gen)[: counts[name]].sort().values  # (k_module,)
        entries[name] = {"weight": SparseDelta(weight, positions, config.init_weights)}
    add_deltas(model, adapter_name, entries)


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
    counts, start = {}, 0
    for name, layer in layers.items():
        weight = innermost(layer).weight
        positions = chosen[start : start + weight.numel()].nonzero().squeeze(1)  # (k_module,)
        start += weight.numel()
        entry = SparseDelta(weight, positions).train(layer.training)
        if values is not None:
            entry.values.copy_(values[name].reshape(-1)[positions])
        layer.selective_delta[adapter_name]["weight"] = entry
        counts[name] = len(positions)
    config.selected_counts = counts
    model.set_adapter(model.active_adapter)  # the new values are what trains
