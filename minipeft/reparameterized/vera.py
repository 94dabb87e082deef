"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko et al., 2024, arXiv:2310.11454).
Taught in chapter 07.

One pair of random matrices A (r, d_in_max) and B (d_out_max, r) is shared by every adapted
layer and frozen; each layer trains two vectors only:

    Delta W = diag(lambda_b) B[:d_out] diag(lambda_d) A[:, :d_in],   lambda_b: (d_out,),  lambda_d: (r,)

so a layer costs d_out + r parameters however large r is (the paper uses r = 256 and more: r
above min(d_in, d_out) is allowed here, since the random A and B are free and more of them
give the vectors more directions to pick from). lambda_b starts at zero: identity at init.

A and B are drawn from a seeded generator (`projection_prng_key`) in the same order and shape as
HF peft, so they are never stored: the adapter file holds the vectors only and the same seed
regenerates the same matrices, in minipeft and in peft (`save_projection=False`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import Method, PeftConfig, register
from ..core.layers import TunerLayer
from ..core.targets import LINEAR_TYPES
from .lora import LORA


@dataclass
class VeraConfig(PeftConfig):
    peft_type = "VERA"
    # Rank of the shared random matrices; the paper's default (trainable count grows by 1 per layer per r).
    r: int = 256
    # Seed of the generator that draws A and B; with it the matrices are regenerated, never saved.
    projection_prng_key: int = 0
    # peft can store A and B in the file; minipeft never does (the point of the seed). Must stay False.
    save_projection: bool = False
    # Dropout on the adapter's input; 0 = off.
    vera_dropout: float = 0.0
    # Initial value of every lambda_d entry (the paper finds small values train best).
    d_initial: float = 0.1
    # True: lambda_b = 0 (identity at init). False: random vectors (tests).
    init_weights: bool = True
    # Written for peft: GPT-2's Conv1D stores weights as (in, out). minipeft detects it per layer.
    fan_in_fan_out: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r < 1:
            raise ValueError(f"VeraConfig.r must be a positive integer (e.g. 256), got {self.r}")
        if self.save_projection:
            raise ValueError(
                "VeraConfig.save_projection=True is not supported: minipeft regenerates A and B from "
                "projection_prng_key instead of storing them; use save_projection=False"
            )


class VeraProjection(nn.Module):
    """The shared frozen A and B, as non-persistent buffers: they move with the model, never saved."""

    def __init__(self, r: int, d_in: int, d_out: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("A", kaiming_uniform((r, d_in), gen), persistent=False)  # (r, d_in_max)
        self.register_buffer("B", kaiming_uniform((d_out, r), gen), persistent=False)  # (d_out_max, r)


def kaiming_uniform(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """U(-b, b) with b = sqrt(6 / fan_in), fan_in = shape[1] (He et al. for ReLU gain)."""
    bound = math.sqrt(6.0 / shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


class VeraLayer(TunerLayer):
    """One base linear with named VeRA adapters: two trainable vectors, a view into the shared A, B."""

    adapter_layer_names = ("vera_lambda_b", "vera_lambda_d", "vera_dropout")
    base_types = LINEAR_TYPES

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_dropout = nn.ModuleDict()
        # Set by VeraMethod.link: the same module in every layer (named_modules and .to() see it once).
        # Not an adapter dict on purpose: nothing in it is trained or saved.
        self.vera_projection = nn.ModuleDict()

    def add_adapter(self, name: str, config: VeraConfig) -> None:
        kwargs = dict(device=self.weight.device, dtype=self.weight.dtype)
        if config.init_weights:
            lambda_b = torch.zeros(self.out_features, **kwargs)
            lambda_d = torch.full((config.r,), config.d_initial, **kwargs)
        else:
            lambda_b, lambda_d = torch.randn(self.out_features, **kwargs), torch.randn(config.r, **kwargs)
        self.vera_lambda_b[name], self.vera_lambda_d[name] = nn.Parameter(lambda_b), nn.Parameter(lambda_d)
        self.vera_dropout[name] = nn.Dropout(config.vera_dropout) if config.vera_dropout > 0 else nn.Identity()

    def matrices(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's slices of the shared A (r, d_in) and B (d_out, r)."""
        proj = self.vera_projection[name]
        return proj.A[:, : self.in_features], proj.B[: self.out_features]

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.matrices(name)
        lambda_b, lambda_d = self.vera_lambda_b[name], self.vera_lambda_d[name]
        return (lambda_b[:, None] * b) @ (lambda_d[:, None] * a)  # (d_out, d_in)

    def apply_adapter(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self.matrices(name)
        x = self.vera_dropout[name](x.to(a.dtype))  # (..., d_in)
        update = F.linear(F.linear(x, a) * self.vera_lambda_d[name], b) * self.vera_lambda_b[name]  # (..., d_out)
        return result + update.to(result.dtype)


class VeraMethod(Method):
    """One projection shared by every layer of the adapter, sized for the largest layer."""

    def link(self, model: nn.Module, config: PeftConfig, adapter_name: str, layers: dict[str, nn.Module]) -> None:
        layers = list(layers.values())
        d_in, d_out = max(m.in_features for m in layers), max(m.out_features for m in layers)
        projection = VeraProjection(config.r, d_in, d_out, config.projection_prng_key).to(layers[0].weight.device)
        for layer in layers:
            layer.vera_projection[adapter_name] = projection


VERA = register(VeraMethod(VeraConfig, VeraLayer, default_roles=LORA.default_roles))
