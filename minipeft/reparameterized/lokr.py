"""LoKr: low-rank Kronecker product (Yeh et al., 2024, "Navigating Text-To-Image Customization:
From LyCORIS Fine-Tuning to Model Evaluation", arXiv:2309.14859), as in HF peft. Taught in chapter 07.

The update is a Kronecker product of a small and a larger factor:

    Delta W = s * W1 ⊗ W2,   W1: (a, c),  W2: (b, d),  d_out = a b,  d_in = c d,  s = alpha / r

Each of d_in and d_out is split into two factors (the pair closest to its square root, or
`decompose_factor` and the rest). W2 is itself a rank-r product W2a W2b when r is below half its
size, and so is W1 when `decompose_both`. A Kronecker product's rank is the product of its
factors' ranks, so a few hundred parameters give a full-rank update.

For a linear layer the update is never built in the forward pass: with x viewed as a (c, d)
matrix X, (W1 ⊗ W2) x = vec(W1 X W2^T), two small matrix products. A convolution splits its input
channels (d_in = c d) and puts its kernel into W2 (b, d * k); its update is built and convolved.
W1 starts at zero (identity at init). Parameter names and shapes are HF peft's (`lokr_w1`, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core import layer_types
from ..core.config import Method, RankPatterns, register
from ..core.layers import TunerLayer, innermost
from .lora import LORA


@dataclass
class LoKrConfig(RankPatterns):
    peft_type = "LOKR"
    # Rank of the low-rank factor(s); unused for a factor whose full size is below 2r. peft's default.
    r: int = 8
    # Numerator of the scaling s = alpha / r.
    alpha: float = 8
    # Also write the small factor W1 as a rank-r product (only saves parameters for large layers).
    decompose_both: bool = False
    # -1: split each dimension into the factor pair closest to its square root; k > 0: into (k, dim / k).
    decompose_factor: int = -1
    # True: W1 = 0, so the model starts at the base model. False: all factors random (tests).
    init_weights: bool = True
    # Convolutions with a kernel above 1 and a low-rank W2: W2 as a core T2 (r, r, *kernel) times W2a (r, b)
    # and W2b (r, d) (LyCORIS' CP layout). False: W2b (r, d * k).
    use_effective_conv2d: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r < 1:
            raise ValueError(f"LoKrConfig.r must be a positive integer (e.g. 8), got {self.r}")
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise ValueError(
                f"LoKrConfig.decompose_factor must be -1 or a positive divisor, got {self.decompose_factor}"
            )


def factorize(dim: int, factor: int, what: str) -> tuple[int, int]:
    """Split dim = m * n with m <= n closest to sqrt(dim) (factor -1), or m = factor."""
    if factor > 0:
        if dim % factor:
            divisors = [k for k in range(2, dim) if dim % k == 0][:8]
            raise ValueError(
                f"LoKr decompose_factor={factor} does not divide {what}={dim} of this layer, so W1 ⊗ W2 cannot "
                f"have its shape. Use a divisor of {dim} (e.g. {divisors}) or -1 (closest to sqrt)"
            )
        return factor, dim // factor
    m = max(k for k in range(1, math.isqrt(dim) + 1) if dim % k == 0)
    return m, dim // m


def kron_matvec(w1: torch.Tensor, x: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """(W1 ⊗ W2) x without building the product: with x (..., c d) viewed as a (c, d) matrix X, it is
    vec(W1 X W2^T). w1 (a, c), w2 (b, d) -> (..., a b). Stacked factors w1 (n, a, c), w2 (n, b, d) give
    the sum of the n products, sum_i (W1_i ⊗ W2_i) x (Compacter's PHM layer, hybrid/compacter.py)."""
    stack = "n" if w1.dim() == 3 else ""
    grid = x.reshape(*x.shape[:-1], w1.shape[-1], w2.shape[-1])  # (..., c, d)
    # einsum's contraction order, unlike chained @, does not depend on requires_grad.
    out = torch.einsum(f"{stack}ac,...cd,{stack}bd->...ab", w1, grid, w2)  # (..., a, b)
    return out.reshape(*x.shape[:-1], w1.shape[-2] * w2.shape[-2])  # (..., a b)


class LoKrLayer(TunerLayer):
    """One base layer (a linear or a convolution) with named LoKr adapters; each factor is full (`lokr_w1`)
    or low-rank (`_a`, `_b`). A convolution's kernel goes into W2: (b, d, *kernel), or W2b (r, d * k)."""

    adapter_layer_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    base_types = (nn.Linear, Conv1D, nn.Conv1d, nn.Conv2d)  # peft's, and GPT-2's Conv1D

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for attr in self.adapter_layer_names:
            setattr(self, attr, nn.ParameterDict())
        self.scaling: dict[str, float] = {}

    def adapter_names(self) -> list[str]:
        return [*self.lokr_w1.keys(), *self.lokr_w1_a.keys()]

    def add_adapter(self, name: str, config: LoKrConfig) -> None:
        base = innermost(self)
        kernel = layer_types.kernel_size(base)  # () for a linear
        d_out, fan_in = layer_types.matrix_shape(base)  # fan_in = d_in (/ groups) * kernel size
        a, b = factorize(d_out, config.decompose_factor, "d_out")
        c, d = factorize(fan_in // math.prod(kernel), config.decompose_factor, "d_in")
        r, weight = config.r, self.weight
        self.scaling[name] = config.alpha / r

        def new(attr: str, shape: tuple[int, ...]) -> None:
            getattr(self, attr)[name] = nn.Parameter(torch.empty(shape, device=weight.device, dtype=weight.dtype))
            nn.init.kaiming_uniform_(getattr(self, attr)[name], a=math.sqrt(5))

        k = math.prod(kernel)
        for i, (rows, cols, low_rank) in enumerate([(a, c, config.decompose_both), (b, d, True)], start=1):
            if i == 2 and config.use_effective_conv2d and k > 1 and r < max(rows, cols) / 2:  # peft's CP layout
                new("lokr_t2", (r, r, *kernel, 1)[:4])  # a 1D kernel as (k, 1)
                new("lokr_w2_a", (r, rows))
                new("lokr_w2_b", (r, cols))
            elif low_rank and r < max(rows, cols) / 2:  # a rank-r product is smaller than the full factor
                new(f"lokr_w{i}_a", (rows, r))
                new(f"lokr_w{i}_b", (r, cols * (k if i == 2 else 1)))  # W2b: (r, d * k)
            else:
                new(f"lokr_w{i}", (rows, cols, *(kernel if i == 2 else ())))  # W2: (b, d, *kernel)
        if config.init_weights:  # W1 = 0 (or its first factor): Delta W = 0
            nn.init.zeros_(self.lokr_w1[name] if name in self.lokr_w1 else self.lokr_w1_a[name])

    def factor(self, i: int, name: str) -> torch.Tensor:
        """W1 (a, c) or W2 (b, d * k), from its low-rank product when it has one."""
        if name in getattr(self, f"lokr_w{i}"):
            full = getattr(self, f"lokr_w{i}")[name]
            return full.reshape(full.shape[0], -1)  # a convolution's (b, d, *kernel) as (b, d * k)
        if i == 2 and name in self.lokr_t2:  # sum_ij T2[i, j, ...] W2a[i, b] W2b[j, d]: (b, d, *kernel)
            w2 = torch.einsum("ijkl,ip,jq->pqkl", self.lokr_t2[name], self.lokr_w2_a[name], self.lokr_w2_b[name])
            return w2.reshape(w2.shape[0], -1)
        return getattr(self, f"lokr_w{i}_a")[name] @ getattr(self, f"lokr_w{i}_b")[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        w1, w2 = self.factor(1, name), self.factor(2, name)  # (a, c), (b, d k)
        if name in self.lokr_w2 and self.lokr_w2[name].dim() == 3:
            # peft's file format for a full W2 (b, d, k) of an nn.Conv1d: kron((1, a, c), W2) is (b, a d, c k),
            # read as the weight (a b, c d, k). Another layout than Conv2d's; files must mean the same.
            w2, b = self.lokr_w2[name], self.lokr_w2[name].shape[0]
            return torch.kron(w1[None], w2).reshape(w1.shape[0] * b, -1) * self.scaling[name]
        return torch.kron(w1, w2) * self.scaling[name]  # (a b, c d k)

    def apply_adapter(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        base = innermost(self)
        if layer_types.is_conv(base):  # build Delta W and convolve as the base does
            delta = self.delta_weight(name)  # (d_out, fan_in)
            return result + layer_types.apply_weight(base, x.to(delta.dtype), delta).to(result.dtype)
        w1, w2 = self.factor(1, name), self.factor(2, name)  # (a, c), (b, d)
        update = kron_matvec(w1, x.to(w1.dtype), w2)  # (..., d_out)
        return result + (update * self.scaling[name]).to(result.dtype)


LOKR = register(Method(LoKrConfig, LoKrLayer, default_roles=LORA.default_roles))
