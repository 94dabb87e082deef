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

from .. import kernels
from ..core.config import Method, PeftConfig, register
from ..core.layers import TunerLayer, check_rank
from . import dora
from .init import pissa_init


@dataclass
class LoraConfig(PeftConfig):
    peft_type = "LORA"
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
    """One base linear (nn.Linear or Conv1D) with named LoRA adapters."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters only
        self.scaling: dict[str, float] = {}
        self.kernel: dict[str, str] = {}  # LoraConfig.kernel per adapter

    def add_adapter(self, name: str, config: LoraConfig) -> None:
        r = config.r
        check_rank(self, r, "LoRA")
        weight = self.weight
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=weight.device, dtype=weight.dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=weight.device, dtype=weight.dtype)
        self.lora_dropout[name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.scaling[name] = config.scaling
        self.kernel[name] = config.kernel
        config.fan_in_fan_out |= self.fan_in_fan_out  # recorded for peft, which reads it from the file
        self.reset_lora(name, config.init_lora_weights)
        if config.use_dora:
            dora.init_magnitude(self, name)

    @torch.no_grad()
    def reset_lora(self, name: str, init: bool | str) -> None:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if init == "pissa":
            return pissa_init(self, name)
        if init == "gaussian":
            nn.init.normal_(a, std=1.0 / self.lora_A[name].out_features)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's own default
        if init is False:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        else:
            nn.init.zeros_(b)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        fused = kernels.lora_forward(self, x, extra=bool(args or kwargs))  # None: take the torch path
        return fused if fused is not None else super().forward(x, *args, **kwargs)

    def apply_per_row(self, x: torch.Tensor, result: torch.Tensor, names: list[str]) -> torch.Tensor:
        gathered = kernels.lora_rows(self, x, result, names)  # Punica-style kernel (chapter 11), or None
        return gathered if gathered is not None else super().apply_per_row(x, result, names)

    def apply_adapter(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        if name in self.lora_magnitude_vector:
            return dora.apply(self, x, result, name)
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        x = self.lora_dropout[name](x.to(lora_a.weight.dtype))  # (..., d_in)
        update = lora_b(lora_a(x)) * self.scaling[name]  # (..., r) -> (..., d_out)
        return result + update.to(result.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        if name in self.lora_magnitude_vector:
            return dora.delta_weight(self, name)
        return self.lora_B[name].weight @ self.lora_A[name].weight * self.scaling[name]  # (d_out, d_in)


LORA = register(
    Method(
        LoraConfig,
        LoraLayer,
        default_targets={"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "bert": ["query", "value"]},
    )
)
