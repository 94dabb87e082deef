"""Compacter and Compacter++ (Karimi Mahabadi, Henderson and Ruder, 2021, "Compacter: Efficient Low-Rank
Hypercomplex Adapter Layers", arXiv:2106.04647). Taught in chapter 08.

A bottleneck adapter, h + W_up act(W_down h + b_down) + b_up (additive/adapters.py), whose two projections
are parameterized hypercomplex multiplication (PHM) layers: each weight is a sum of n Kronecker products,

    W = sum_{i=1..n} A_i ⊗ B_i,   A_i: (n, n),   B_i = s_i t_i^T: (d_out/n, d_in/n),  rank r,

so n must divide both the model width d and the bottleneck m. The "slow" A_i, one set (n, n, n), are shared
by every PHM layer of the model, down and up projections alike (the released code keeps one `phm_rule` and
sets it on every PHM layer); the "fast" B_i are each layer's own, and low rank (r = 1 in the paper).
Compacter is a hybrid of adapters, PHM layers and low-rank factors. Its cost, per adapter site:

    down  r (m + d) + m,   up  r (d + m) + d,   so  2 r (d + m) + d + m,   plus n^3 once for the model

against 2 d m + d + m for a plain adapter of the same bottleneck (the paper: 4 L (d + m) + n^3 without
biases, L blocks with two sites each). Compacter puts adapters after the attention and after the FFN
(Houlsby placement); Compacter++ only after the FFN (Pfeiffer), here `CompacterConfig(placement="pfeiffer")`:
a field, not a class, since the two differ in placement only, the same field AdapterConfig has.

Initialisation follows the released code: A ~ N(0, 1e-4), each s_i and t_i Glorot-uniform with gain sqrt(2),
biases zero. That does not give exact identity (|f(h)| is 1e-8 to 1e-7 of |h|), so `init_weights=True` (the default)
also zeroes the up projection's t_i: f(h) = 0 exactly at start, as other adapters do. Adapters do not merge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..additive.adapters import AdapterConfig, AdapterMethod, SerialAdapterLayer
from ..core.config import register
from ..core.layers import linear_shape
from ..reparameterized.lokr import kron_matvec


@dataclass
class CompacterConfig(AdapterConfig):
    peft_type = "COMPACTER"
    # d / m when bottleneck_size is None: 32 in the released configs (compacter.json, compacter++.json).
    reduction_factor: int = 32
    # "houlsby": Compacter, after attention and after the FFN. "pfeiffer": Compacter++, after the FFN only.
    placement: Literal["houlsby", "pfeiffer"] = "houlsby"
    # "gelu_new" (GELU's tanh approximation) in the released configs.
    non_linearity: Literal["relu", "gelu", "gelu_new", "tanh"] = "gelu_new"
    # n: the number of Kronecker terms and the size of each A_i; 4 in the paper. Must divide d and m.
    phm_dim: int = 4
    # r: the rank of each fast B_i = s_i t_i^T; 1 in the paper.
    phm_rank: int = 1
    # True: one set of slow A_i for the whole model (the paper). False: each PHM layer its own (n^3 each).
    shared_phm_rule: bool = True
    # Std of A's normal init: 1e-4 in the released configs (phm_init_range with phm_c_init "normal").
    phm_init_range: float = 1e-4
    # True: the up projection's t_i start at zero, exact identity at init. False: the released code's init.
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for field, value, paper in (("phm_dim", self.phm_dim, 4), ("phm_rank", self.phm_rank, 1)):
            if value < 1:
                raise ValueError(
                    f"{type(self).__name__}.{field} must be a positive integer ({paper} in the paper), got {value}"
                )
        if self.phm_init_range <= 0:
            raise ValueError(
                f"{type(self).__name__}.phm_init_range must be > 0 (1e-4 in the paper), got {self.phm_init_range}"
            )
        if self.bottleneck_size is not None and self.bottleneck_size % self.phm_dim:
            raise ValueError(
                f"{type(self).__name__}.bottleneck_size={self.bottleneck_size} is not a multiple of phm_dim="
                f"{self.phm_dim}: each A_i ⊗ B_i needs n | m. Use a multiple of {self.phm_dim} (e.g. "
                f"{self.phm_dim * max(1, round(self.bottleneck_size / self.phm_dim))})"
            )

    def projection(self, d_in: int, d_out: int, like: torch.Tensor, up: bool) -> nn.Module:
        return PHMLinear(d_in, d_out, self, like, zero=up and self.init_weights)


def slow_weights(config: CompacterConfig, like: torch.Tensor) -> nn.Parameter:
    """A new set of A_i, (n, n, n), drawn from N(0, phm_init_range^2) as in the released code."""
    n = config.phm_dim
    return nn.Parameter(torch.empty(n, n, n, device=like.device, dtype=like.dtype).normal_(std=config.phm_init_range))


def glorot(t: torch.Tensor) -> torch.Tensor:
    """Each (rows, cols) slice U(-b, b), b = sqrt(2) sqrt(6 / (rows + cols)): Glorot-uniform with gain sqrt(2)."""
    bound = math.sqrt(12.0 / (t.shape[-2] + t.shape[-1]))
    return t.uniform_(-bound, bound)


class PHMLinear(nn.Module):
    """y = W x + b, W = sum_i A_i ⊗ s_i t_i^T in nn.Linear layout (d_out, d_in), never built: kron_matvec."""

    def __init__(self, d_in: int, d_out: int, config: CompacterConfig, like: torch.Tensor, zero: bool) -> None:
        super().__init__()
        n, r = config.phm_dim, config.phm_rank
        kwargs = dict(device=like.device, dtype=like.dtype)
        self.s = nn.Parameter(glorot(torch.empty(n, d_out // n, r, **kwargs)))  # (n, d_out/n, r)
        self.t = nn.Parameter(glorot(torch.empty(n, d_in // n, r, **kwargs)))  # (n, d_in/n, r)
        if zero:
            nn.init.zeros_(self.t)
        self.bias = nn.Parameter(torch.zeros(d_out, **kwargs))  # (d_out,)
        # The slow A (n, n, n), read through this dict: one layer owns it (registered as `phm_rule`, so it is
        # trained and saved once), the others hold the same tensor unregistered (`CompacterMethod.link`).
        self.slow: dict[str, nn.Parameter] = {}
        if not config.shared_phm_rule:
            self.attach(slow_weights(config, like), owner=True)

    def attach(self, rule: nn.Parameter, owner: bool) -> None:
        self.slow["A"] = rule
        if owner:
            self.phm_rule = rule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = self.s @ self.t.transpose(1, 2)  # B_i = s_i t_i^T: (n, d_out/n, d_in/n)
        return kron_matvec(self.slow["A"], x, fast) + self.bias  # (..., d_in) -> (..., d_out)


class CompacterMethod(AdapterMethod):
    """The serial adapter's placement and layer; checks n against every site's d and m before anything changes,
    and gives every PHM layer of the adapter one set of slow weights."""

    def resolve(self, model: nn.Module, config: CompacterConfig) -> CompacterConfig:
        n, r = config.phm_dim, config.phm_rank
        for name in self.targets(model, config):
            d = linear_shape(model.get_submodule(name))[1]
            m = config.width(d)
            if d % n:
                fits = [k for k in range(1, d + 1) if d % k == 0 and m % k == 0][-4:]
                raise ValueError(
                    f"CompacterConfig.phm_dim={n} does not divide the width d={d} of module {name!r} (the adapter's "
                    f"input and output). Use a phm_dim dividing both d={d} and the bottleneck m={m}: {fits}"
                )
            if m < n or m % n:
                fits = [f for f in range(1, d + 1) if d % f == 0 and (d // f) % n == 0][-4:]
                raise ValueError(
                    f"CompacterConfig.phm_dim={n} does not divide the bottleneck m={m} of module {name!r} (m = "
                    f"bottleneck_size or d // reduction_factor = {d} // {config.reduction_factor}). Pass a "
                    f"bottleneck_size that is a multiple of {n}, or a reduction_factor among {fits}"
                )
            if r > m // n:
                raise ValueError(
                    f"CompacterConfig.phm_rank={r} exceeds min(m, d) / n = {m // n}, the size of the fast B_i of "
                    f"module {name!r}; a higher rank adds parameters but no expressiveness. Use phm_rank <= {m // n}"
                )
        return config

    def link(self, model: nn.Module, config: CompacterConfig, adapter_name: str, layers: dict[str, nn.Module]) -> None:
        if not config.shared_phm_rule:
            return
        phms = [
            m for layer in layers.values() for m in layer.adapter[adapter_name].modules() if isinstance(m, PHMLinear)
        ]
        rule = slow_weights(config, phms[0].bias)
        for i, phm in enumerate(phms):
            phm.attach(rule, owner=i == 0)


COMPACTER = register(CompacterMethod(CompacterConfig, SerialAdapterLayer))
