"""LoHa: low-rank Hadamard product (Hyeon-Woo et al., 2022, "FedPara", arXiv:2108.06098), as
used by LyCORIS and HF peft. Taught in chapter 07.

Two rank-r products are multiplied element-wise:

    Delta W = s * (W1a W1b) ⊙ (W2a W2b),   W1a, W2a: (d_out, r),  W1b, W2b: (r, d_in),  s = alpha / r

The Hadamard product of two rank-r matrices can have rank up to r^2, so LoHa reaches a
higher-rank update than LoRA for 2x LoRA's parameters, 2 r (d_in + d_out) per matrix.
W2b starts at zero, so the model starts at the base model. The update has no cheap factored
form, so the forward pass builds Delta W (d_out x d_in) once per call.
Parameter names are HF peft's (`hada_w1_a`, ...), so files load in peft (which adapts
nn.Linear only; minipeft also adapts GPT-2's Conv1D).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import Method, PeftConfig, register
from ..core.layers import TunerLayer, check_rank
from .lora import LORA


@dataclass
class LoHaConfig(PeftConfig):
    peft_type = "LOHA"
    # Rank of each of the two factors; the update's rank can reach r^2. peft's default.
    r: int = 8
    # Numerator of the scaling s = alpha / r, as in LoRA.
    alpha: float = 8
    # True: W2b = 0, so the model starts at the base model. False: all factors random (tests).
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r < 1:
            raise ValueError(f"LoHaConfig.r must be a positive integer (e.g. 8), got {self.r}")


class LoHaLayer(TunerLayer):
    """One base linear with named LoHa adapters."""

    adapter_layer_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for attr in self.adapter_layer_names:
            setattr(self, attr, nn.ParameterDict())
        self.scaling: dict[str, float] = {}

    def add_adapter(self, name: str, config: LoHaConfig) -> None:
        check_rank(self, config.r, "LoHa")
        weight, r = self.weight, config.r
        shapes = {"a": (self.out_features, r), "b": (r, self.in_features)}
        for attr in self.adapter_layer_names:
            empty = torch.empty(shapes[attr[-1]], device=weight.device, dtype=weight.dtype)
            getattr(self, attr)[name] = nn.Parameter(empty)
            nn.init.kaiming_uniform_(getattr(self, attr)[name], a=math.sqrt(5))
        if config.init_weights:
            nn.init.zeros_(self.hada_w2_b[name])  # one zero factor is enough for Delta W = 0
        self.scaling[name] = config.alpha / r

    def delta_weight(self, name: str) -> torch.Tensor:
        first = self.hada_w1_a[name] @ self.hada_w1_b[name]  # (d_out, d_in), rank <= r
        second = self.hada_w2_a[name] @ self.hada_w2_b[name]  # (d_out, d_in), rank <= r
        return first * second * self.scaling[name]  # (d_out, d_in), rank <= r^2

    def apply_adapter(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        delta = self.delta_weight(name)  # (d_out, d_in)
        return result + F.linear(x.to(delta.dtype), delta).to(result.dtype)  # (..., d_out)


LOHA = register(Method(LoHaConfig, LoHaLayer, default_targets=LORA.default_targets))
