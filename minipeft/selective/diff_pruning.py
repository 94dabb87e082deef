"""Diff pruning: a learned sparse difference vector on top of the frozen weights
(Guo, Rush and Kim, 2021, "Parameter-Efficient Transfer Learning with Diff Pruning",
arXiv:2012.07463), with the hard-concrete relaxation of the L0 norm (Louizos, Welling and
Kingma, 2018, arXiv:1712.01312). Taught in chapter 06.

Two phases:

1. Search. Every targeted entry gets a diff w and a gate z in [0, 1]: delta = z * w. In training
   z is sampled from a hard-concrete distribution with location log_alpha,

       u ~ U(0, 1),  s = sigmoid((log u - log(1 - u) + log_alpha) / beta),  z = clamp(s (zeta - gamma) + gamma, 0, 1)

   and the expected number of non-zero gates, sum_i sigmoid(log_alpha_i - beta log(-gamma / zeta)),
   is penalised. At evaluation z is its deterministic value clamp(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1).
   This phase trains 2N parameters: it saves storage, not training memory.
2. Projection (`project_to_budget`). Keep the k = round(sparsity * N) entries with the largest
   |z * w| over the whole model (projection onto the L0 ball) and continue training those k values
   with the mask fixed. The adapter is then stored sparse, like FishMask's.

The penalty enters through the backward pass: each time the gates are sampled, its gradient
lambda / N * d E[L0] / d log_alpha is added to log_alpha's gradient. That equals adding
lambda * E[L0] / N to the loss, so any training loop works unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import register, require
from ..core.layers import innermost
from .deltas import DeltaLayer, delta_layers, initial_values
from .masks import SparseConfig, SparseDeltaLayer, SparseMethod, keep_top_k

# Hard-concrete constants of Louizos et al.: temperature beta and the stretch interval (gamma, zeta).
BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1
# Shift of log_alpha in P(z != 0) = sigmoid(log_alpha - L0_SHIFT).
L0_SHIFT = BETA * math.log(-GAMMA / ZETA)


@dataclass
class DiffPruningConfig(SparseConfig):
    peft_type = "DIFF_PRUNING"
    # Weight of the L0 penalty on the expected *fraction* of open gates (the paper's sum divided by N, so
    # one value works at any size): 40 is the paper's 1.25e-7 per entry times BERT-large's ~335M entries.
    l0_lambda: float = 40.0
    # Initial log_alpha of every gate: 3 opens them (P(z != 0) = 0.99), so the search starts dense.
    init_log_alpha: float = 3.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "l0_lambda", self.l0_lambda >= 0, ">= 0 (the weight of a penalty; 0 turns it off)")


class _AddL0Gradient(torch.autograd.Function):
    """Identity on log_alpha; its backward adds the gradient of weight * P(z != 0)."""

    @staticmethod
    def forward(ctx, log_alpha: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.save_for_backward(log_alpha)
        ctx.weight = weight
        return log_alpha.view_as(log_alpha)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (log_alpha,) = ctx.saved_tensors
        p = torch.sigmoid(log_alpha - L0_SHIFT)  # P(z != 0)
        return grad + ctx.weight * p * (1 - p), None


class HardConcreteDelta(nn.Module):
    """delta = z * w for one weight, with a hard-concrete gate z per entry."""

    def __init__(self, param: torch.Tensor, config: DiffPruningConfig, penalty: float = 0.0) -> None:
        super().__init__()
        self.w = initial_values(tuple(param.shape), param, config.init_weights)
        self.log_alpha = nn.Parameter(torch.full_like(param, config.init_log_alpha))
        self.penalty = penalty  # lambda / N, the L0 weight per entry (DiffPruningMethod.link sets it: it knows N)

    def gate(self) -> torch.Tensor:
        if not self.training:
            return (torch.sigmoid(self.log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)
        log_alpha = _AddL0Gradient.apply(self.log_alpha, self.penalty)
        u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((u.log() - (-u).log1p() + log_alpha) / BETA)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def forward(self) -> torch.Tensor:
        return self.gate() * self.w  # same shape as the base weight


def _search_layers(model: nn.Module, adapter_name: str) -> dict[str, DeltaLayer]:
    layers = delta_layers(model, adapter_name)
    if not all(
        isinstance(layer.selective_delta[adapter_name]["weight"], HardConcreteDelta) for layer in layers.values()
    ):
        raise ValueError(f"adapter {adapter_name!r} is not in its search phase (already projected to its budget?)")
    return layers


@torch.no_grad()
def expected_density(model: nn.Module, adapter_name: str | None = None) -> float:
    """The expected fraction of non-zero gates, E[L0] / N, during the search phase."""
    name = adapter_name or model.active_adapter
    gates = [
        layer.selective_delta[name]["weight"].log_alpha
        for layer in _search_layers(model.base_model.model, name).values()
    ]
    return sum(torch.sigmoid(g - L0_SHIFT).sum().item() for g in gates) / sum(g.numel() for g in gates)


def parameter_groups(model: nn.Module, lr: float, gate_lr: float) -> list[dict]:
    """Optimizer groups for the search: the gates' log_alpha at `gate_lr`, everything else that trains at `lr`.
    The gates need the larger rate: with Adam each moves about one learning rate per step, and a few hundred
    steps at a diff's learning rate would leave them where they started."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    gates = [p for n, p in trainable if n.endswith(".log_alpha")]
    return [
        {"params": [p for n, p in trainable if not n.endswith(".log_alpha")], "lr": lr},
        {"params": gates, "lr": gate_lr},
    ]


@torch.no_grad()
def project_to_budget(model: nn.Module, adapter_name: str | None = None) -> None:
    """End the search: keep the k largest |z * w| (deterministic gates) over all targeted weights, as
    positions + values. Build the optimizer after this call: the parameters are new."""
    name = adapter_name or model.active_adapter
    diffs = {n: layer.delta(name, "weight") for n, layer in _search_layers(model.base_model.model, name).items()}
    keep_top_k(model, name, {n: d.abs() for n, d in diffs.items()}, values=diffs)


class DiffPruningLayer(SparseDeltaLayer):
    """Search phase: a gated diff z * w over the whole weight; once projected (`selected_counts` recorded,
    e.g. when loading), k sparse values like FishMask's."""

    def new_entries(self, config: DiffPruningConfig) -> dict[str, nn.Module]:
        if config.selected_counts is not None:
            return super().new_entries(config)
        return {"weight": HardConcreteDelta(innermost(self).weight, config)}


class DiffPruningMethod(SparseMethod):
    def link(
        self, model: nn.Module, config: DiffPruningConfig, adapter_name: str, layers: dict[str, nn.Module]
    ) -> None:
        """Projected: place the sparse entries. Searching: the L0 weight per entry is lambda / N, N over all layers."""
        if config.selected_counts is not None:
            return super().link(model, config, adapter_name, layers)
        entries = [layer.selective_delta[adapter_name]["weight"] for layer in layers.values()]
        total = sum(e.w.numel() for e in entries)
        for entry in entries:
            entry.penalty = config.l0_lambda / total


DIFF_PRUNING = register(DiffPruningMethod(DiffPruningConfig, DiffPruningLayer, default_roles=("linear",)))
