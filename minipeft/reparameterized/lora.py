"""LoRA: Low-Rank Adaptation (Hu et al., 2022, arXiv:2106.09685), with rsLoRA scaling
(Kalajdzievski, 2023, arXiv:2312.03732). Taught in chapter 02.

The frozen weight W0 (d_out x d_in) gets a trainable low-rank update:

    h = W0 x + s * B A x,    A: (r, d_in),  B: (d_out, r),  s = alpha / r  (rsLoRA: alpha / sqrt(r))

B starts at zero, so the adapted model starts exactly at the base model. The update
s * B A can be merged into W0 after training, which makes inference cost nothing extra.
Parameter names and config fields are HF peft's, so adapter files are interchangeable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core import layer_types
from ..core.config import Method, RankPatterns, register
from ..core.layers import TunerLayer, check_rank, innermost
from ..core.targets import is_linear
from . import dora
from . import lora_kernels as kernels
from .init import pissa_init


@dataclass
class LoraConfig(RankPatterns):
    peft_type = "LORA"
    alpha_field = "lora_alpha"  # the field alpha_pattern sets (RankPatterns)
    # Rank of the update; 8 is the common default and the LoRA paper finds r = 1-8 enough on GPT-3.
    r: int = 8
    # Numerator of the scaling s = alpha / r; keeping alpha fixed makes lr less sensitive to r.
    lora_alpha: float = 8
    # Dropout on the adapter's input only (the base path is untouched); 0 = off.
    lora_dropout: float = 0.0
    # s = alpha / sqrt(r) instead of alpha / r, so that larger ranks still learn (rsLoRA).
    use_rslora: bool = False
    # True: A Kaiming-uniform, B = 0 (identity at init). "gaussian": A ~ N(0, 1/r), B = 0.
    # "pissa": A, B from the top-r SVD of W0, base keeps the residual (identity at init; chapter 07).
    # False: B random too (no identity; used by tests to get a non-zero update).
    init_lora_weights: bool | Literal["gaussian", "pissa"] = True
    # DoRA: train a per-row magnitude and let LoRA steer only the direction (chapter 07).
    use_dora: bool = False
    # Written for peft: GPT-2's Conv1D stores weights as (in, out). minipeft detects it per layer.
    fan_in_fan_out: bool = False
    # peft's bias option; minipeft trains no biases under LoRA (BitFit does that, chapter 06).
    bias: Literal["none"] = "none"
    # "triton": fused Triton kernels (chapters 10, 11); "torch": plain PyTorch; "auto": Triton on CUDA, else torch.
    kernel: Literal["auto", "torch", "triton"] = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r < 1:
            raise ValueError(f"LoraConfig.r must be a positive integer (e.g. 8), got {self.r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.kernel == "triton" and (self.lora_dropout > 0 or self.use_dora):
            raise ValueError("LoraConfig(kernel='triton') computes plain LoRA: set lora_dropout=0 and use_dora=False, "
                             "or use kernel='auto' (Triton where it applies, torch elsewhere)")  # fmt: skip

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self) -> dict:
        # `kernel` is how this machine runs the adapter, not part of it (and peft does not know the field).
        return {k: v for k, v in super().to_dict().items() if k != "kernel"}


class LoraLayer(TunerLayer):
    """One base layer with named LoRA adapters. Linear, Conv1D and convolutions keep A and B as modules
    (A: the base's kernel and stride, B: pointwise); an embedding keeps them as matrices, under peft's
    names `lora_embedding_A` (r, num_embeddings) and `lora_embedding_B` (dim, r)."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    base_types = (nn.Linear, Conv1D, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters only
        self.scaling: dict[str, float] = {}
        self.kernel: dict[str, str] = {}  # LoraConfig.kernel per adapter

    def adapter_names(self) -> list[str]:
        return [*self.lora_A, *self.lora_embedding_A]

    def add_adapter(self, name: str, config: LoraConfig) -> None:
        r, base = config.r, innermost(self)
        check_rank(self, r, "LoRA")
        if getattr(base, "groups", 1) > 1:
            raise ValueError(f"LoRA on a grouped {type(base).__name__} (groups={base.groups}) cannot merge; "
                             "minipeft adapts convolutions with groups=1 only")  # fmt: skip
        if config.init_lora_weights == "pissa" and not is_linear(base):
            raise ValueError(f"init_lora_weights='pissa' needs a linear layer, got {type(base).__name__}")
        if isinstance(base, nn.Embedding):
            make = dict(device=base.weight.device, dtype=base.weight.dtype)
            self.lora_embedding_A[name] = nn.Parameter(torch.empty(r, self.in_features, **make))  # (r, num_embeddings)
            self.lora_embedding_B[name] = nn.Parameter(torch.empty(self.out_features, r, **make))  # (dim, r)
        else:
            self.lora_A[name] = layer_types.down_projection(base, r)  # d_in -> r with the base's kernel, stride
            self.lora_B[name] = layer_types.up_projection(base, r)  # r -> d_out, pointwise
        # Dropout acts on the adapter's input; an embedding's input is indices, which peft does not drop.
        dropout = config.lora_dropout > 0 and not isinstance(base, nn.Embedding)
        self.lora_dropout[name] = nn.Dropout(config.lora_dropout) if dropout else nn.Identity()
        self.scaling[name] = config.scaling
        self.kernel[name] = config.kernel
        self.reset_lora(name, config.init_lora_weights)
        if config.use_dora:
            dora.init_magnitude(self, name)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A (r, fan_in) and B (d_out, r) as matrices in nn.Linear's layout (a convolution's A flattened)."""
        if name in self.lora_embedding_A:
            return self.lora_embedding_A[name], self.lora_embedding_B[name]
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)

    @torch.no_grad()
    def reset_lora(self, name: str, init: bool | str) -> None:
        if init == "pissa":
            return pissa_init(self, name)
        a, b = self.factors(name)  # views of the stored tensors
        if name in self.lora_embedding_A:  # peft: A = 0, B ~ N(0, 1); both random without init
            nn.init.normal_(b)
            return nn.init.normal_(a) if init is False else nn.init.zeros_(a)
        if init == "gaussian":
            nn.init.normal_(a, std=1.0 / a.shape[0])
        else:
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))  # nn.Linear's own default
        if init is False:
            nn.init.kaiming_uniform_(self.lora_B[name].weight, a=math.sqrt(5))
        else:
            nn.init.zeros_(b)

    def adapter_input(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """What the adapter sees: x after dropout, in the adapter's dtype (an embedding's indices as they are)."""
        if name in self.lora_embedding_A:
            return x
        return self.lora_dropout[name](x.to(self.lora_A[name].weight.dtype))

    def lora_update(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """s B A x for an adapter input x: A applied the way the base applies W (a lookup, a convolution),
        then B on every position's r features."""
        a, b = self.factors(name)  # (r, fan_in), (d_out, r)
        low = layer_types.apply_weight(innermost(self), x, a)  # (..., r) or (B, r, *spatial)
        return layer_types.apply_pointwise(innermost(self), low, b) * self.scaling[name]  # d_out features

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        fused = kernels.lora_forward(self, x, extra=bool(args or kwargs))  # None: take the torch path
        return fused if fused is not None else super().forward(x, *args, **kwargs)

    def apply_per_row(self, x: torch.Tensor, result: torch.Tensor, names: list[str]) -> torch.Tensor:
        gathered = kernels.lora_rows(self, x, result, names)  # Punica-style kernel (chapter 11), or None
        return gathered if gathered is not None else super().apply_per_row(x, result, names)

    def apply_adapter(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        if name in self.lora_magnitude_vector:
            return dora.apply(self, x, result, name)
        update = self.lora_update(self.adapter_input(x, name), name)  # (..., d_out) or (B, d_out, *spatial)
        return result + update.to(result.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        if name in self.lora_magnitude_vector:
            return dora.delta_weight(self, name)
        a, b = self.factors(name)
        return b @ a * self.scaling[name]  # (d_out, fan_in)


# Hu et al. adapt W_q and W_v by default (their Table 5: the best pair at a fixed budget).
LORA = register(Method(LoraConfig, LoraLayer, default_roles=("q", "v")))
