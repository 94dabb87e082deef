"""LoHa: low-rank Hadamard product (Hyeon-Woo et al., 2022, "FedPara", arXiv:2108.06098), as
used by LyCORIS and HF peft. Taught in chapter 07.

Two rank-r products are multiplied element-wise:

    Delta W = s * (W1a W1b) ⊙ (W2a W2b),   W1a, W2a: (d_out, r),  W1b, W2b: (r, d_in),  s = alpha / r

The Hadamard product of two rank-r matrices can have rank up to r^2, so LoHa reaches a
higher-rank update than LoRA for 2x LoRA's parameters, 2 r (d_in + d_out) per matrix.
W2b starts at zero, so the model starts at the base model. The update has no cheap factored
form, so the forward pass builds Delta W (d_out x d_in) once per call.
Parameter names are HF peft's (`hada_w1_a`, ...), so files load in peft. A convolution's
update is the same matrix with d_in = in_channels * kernel size (with `use_effective_conv2d`,
each factor is built from a core over the kernel), applied as a convolution; minipeft also
adapts GPT-2's Conv1D.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core import layer_types
from ..core.config import Method, RankPatterns, register
from ..core.layers import TunerLayer, check_rank, innermost
from .lora import LORA


@dataclass
class LoHaConfig(RankPatterns):
    peft_type = "LOHA"
    # Rank of each of the two factors; the update's rank can reach r^2. peft's default.
    r: int = 8
    # Numerator of the scaling s = alpha / r, as in LoRA.
    alpha: float = 8
    # True: W2b = 0, so the model starts at the base model. False: all factors random (tests).
    init_weights: bool = True
    # Convolutions with a kernel above 1: factor each W as a core T (r, r, *kernel) times Wa (r, d_out) and
    # Wb (r, d_in) (LyCORIS' CP layout, fewer parameters for large kernels). False: the matrix layout.
    use_effective_conv2d: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r < 1:
            raise ValueError(f"LoHaConfig.r must be a positive integer (e.g. 8), got {self.r}")


class LoHaLayer(TunerLayer):
    """One base layer (a linear or a convolution) with named LoHa adapters."""

    adapter_layer_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    base_types = (nn.Linear, Conv1D, nn.Conv1d, nn.Conv2d)  # peft's, and GPT-2's Conv1D

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for attr in self.adapter_layer_names:
            setattr(self, attr, nn.ParameterDict())
        self.scaling: dict[str, float] = {}

    def add_adapter(self, name: str, config: LoHaConfig) -> None:
        check_rank(self, config.r, "LoHa")
        weight, r = self.weight, config.r
        d_out, fan_in = layer_types.matrix_shape(innermost(self))  # a convolution's fan_in: in * kernel size
        kernel = layer_types.kernel_size(innermost(self))
        if config.use_effective_conv2d and math.prod(kernel) > 1:  # peft's CP layout; a 1D kernel as (k, 1)
            shapes = {"a": (r, d_out), "b": (r, fan_in // math.prod(kernel)), "t": (r, r, *kernel, 1)[:4]}
        else:
            shapes = {"a": (d_out, r), "b": (r, fan_in)}
        for attr in [a for a in self.adapter_layer_names if "t" in shapes or not a.startswith("hada_t")]:
            key = "t" if attr.startswith("hada_t") else attr[-1]
            empty = torch.empty(shapes[key], device=weight.device, dtype=weight.dtype)
            getattr(self, attr)[name] = nn.Parameter(empty)
            nn.init.kaiming_uniform_(getattr(self, attr)[name], a=math.sqrt(5))
        if config.init_weights:
            nn.init.zeros_(self.hada_w2_b[name])  # one zero factor is enough for Delta W = 0
        self.scaling[name] = config.alpha / r

    def delta_weight(self, name: str) -> torch.Tensor:
        if name in self.hada_t1:  # CP layout: sum_ij T[i, j, ...] Wa[i, out] Wb[j, in], per factor
            first, second = (
                torch.einsum("ijkl,ip,jq->pqkl", t, a, b)  # (d_out, d_in, *kernel)
                for t, a, b in [(self.hada_t1[name], self.hada_w1_a[name], self.hada_w1_b[name]),
                                (self.hada_t2[name], self.hada_w2_a[name], self.hada_w2_b[name])]
            )  # fmt: skip
            return (first * second * self.scaling[name]).reshape(first.shape[0], -1)  # (d_out, fan_in)
        first = self.hada_w1_a[name] @ self.hada_w1_b[name]  # (d_out, fan_in), rank <= r
        second = self.hada_w2_a[name] @ self.hada_w2_b[name]  # (d_out, fan_in), rank <= r
        return first * second * self.scaling[name]  # (d_out, fan_in), rank <= r^2

    def apply_adapter(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        delta = self.delta_weight(name)  # (d_out, fan_in)
        update = layer_types.apply_weight(innermost(self), x.to(delta.dtype), delta)  # as the base applies W
        return result + update.to(result.dtype)  # (..., d_out) or (B, d_out, *spatial)


LOHA = register(Method(LoHaConfig, LoHaLayer, default_roles=LORA.default_roles))
