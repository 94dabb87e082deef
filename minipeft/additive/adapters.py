"""Bottleneck adapters: serial (Houlsby et al., 2019, arXiv:1902.00751; Pfeiffer et al.,
2021, arXiv:2005.00247) and parallel (He et al., 2022, arXiv:2110.04366). Taught in chapter 03.

An adapter is a small bottleneck network with a residual connection,

    f(h) = W_up act(W_down h + b_down) + b_up,   W_down: (m, d),  W_up: (d, m),  m << d,

inserted into a frozen transformer block. Where it goes is the whole difference:

- serial, Houlsby placement: h <- h + f(h) on the output of the attention sublayer *and*
  of the feed-forward sublayer (two adapters per block), before the residual add;
- serial, Pfeiffer placement: only after the feed-forward sublayer (one per block).
  (Pfeiffer et al. put it after the FFN's add & norm; we use the same site before the
  residual add, which is the form He et al. 2022 compare.)
- parallel: FFN(x) + s * f(x), a bottleneck *beside* the feed-forward sublayer that reads
  the sublayer's input x, scaled by s (He et al. use s = 4).

W_up starts at zero, so the adapted model starts exactly at the base model. Each site
costs 2 d m + m + d parameters. Adapters cannot be merged: act() is nonlinear.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..core.architectures import role_pattern
from ..core.config import Method, PeftConfig, register
from ..core.layers import TunerLayer, linear_shape
from ..core.targets import LINEAR_TYPES, find_targets, is_linear

# "gelu_new": transformers' name for GELU's tanh approximation (Compacter's released configs use it).
ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_new": functools.partial(nn.GELU, approximate="tanh"),
    "tanh": nn.Tanh,
}


@dataclass
class AdapterConfig(PeftConfig):
    peft_type = "ADAPTER"
    # Bottleneck width m; None derives it from reduction_factor (m = d // reduction_factor).
    bottleneck_size: int | None = None
    # d / m when bottleneck_size is None; 16 is Pfeiffer et al.'s default.
    reduction_factor: int = 16
    # "houlsby": after attention and after the FFN; "pfeiffer": after the FFN only (half the cost).
    placement: Literal["houlsby", "pfeiffer"] = "pfeiffer"
    # The bottleneck's nonlinearity; both papers use ReLU or GELU-like functions.
    non_linearity: Literal["relu", "gelu", "tanh"] = "relu"
    # True: W_up = 0 (exact identity at init). False: W_up random (tests need a non-trivial adapter).
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bottleneck_size is not None and self.bottleneck_size < 1:
            raise ValueError(
                f"{type(self).__name__}.bottleneck_size must be a positive integer (e.g. 16), got "
                f"{self.bottleneck_size}; a bottleneck of size 0 has no parameters to train"
            )
        if self.reduction_factor < 1:
            raise ValueError(f"{type(self).__name__}.reduction_factor must be >= 1, got {self.reduction_factor}")

    def sites(self) -> tuple[str, ...]:
        """The roles (core/architectures.py) whose output gets an adapter."""
        return ("attn_out", "ffn_out") if self.placement == "houlsby" else ("ffn_out",)

    def width(self, d: int) -> int:
        """The bottleneck m for a site of width d."""
        return self.bottleneck_size or d // self.reduction_factor

    def projection(self, d_in: int, d_out: int, like: torch.Tensor, up: bool) -> nn.Module:
        """One of the bottleneck's two maps (d_in -> d_out): a linear layer; the `up` one starts at zero when
        init_weights. Compacter (hybrid/compacter.py) plugs its PHM layers in here."""
        layer = nn.Linear(d_in, d_out, device=like.device, dtype=like.dtype)  # (d_out, d_in)
        if up and self.init_weights:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        elif up:
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5))
        return layer


@dataclass
class ParallelAdapterConfig(AdapterConfig):
    peft_type = "PARALLEL_ADAPTER"
    # Placement is fixed for the parallel adapter: beside the FFN sublayer.
    placement: Literal["ffn"] = "ffn"
    # s in FFN(x) + s f(x); He et al. 2022 found s = 4 better than 1 for parallel adapters.
    scaling: float = 4.0

    def sites(self) -> tuple[str, ...]:
        return ("ffn",)


class Bottleneck(nn.Module):
    """f(h) = up(act(down(h))), the adapter's body (without the residual)."""

    def __init__(self, d: int, config: AdapterConfig, like: torch.Tensor) -> None:
        super().__init__()
        m = config.width(d)
        if m < 1:
            raise ValueError(
                f"bottleneck size d // reduction_factor = {d} // {config.reduction_factor} = 0; "
                f"pass bottleneck_size >= 1 or a reduction_factor <= {d}"
            )
        self.down = config.projection(d, m, like, up=False)  # (m, d)
        self.act = ACTIVATIONS[config.non_linearity]()
        self.up = config.projection(m, d, like, up=True)  # (d, m)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(h.to(self.down.bias.dtype))))  # (..., d) -> (..., m) -> (..., d)


class SerialAdapterLayer(TunerLayer):
    """A sublayer's output projection followed by an adapter: h + f(h), h = base(x)."""

    adapter_layer_names = ("adapter",)
    base_types = LINEAR_TYPES  # it follows a linear projection

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.adapter = nn.ModuleDict()

    def add_adapter(self, name: str, config: AdapterConfig) -> None:
        self.adapter[name] = Bottleneck(self.out_features, config, self.weight)

    def apply_adapter(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        return result + self.adapter[name](result).to(result.dtype)  # (..., d)


class ParallelAdapterLayer(TunerLayer):
    """A whole FFN sublayer with a scaled bottleneck beside it: FFN(x) + s f(x).

    BERT's FFN is split into `intermediate` and `output`; `output(h, x)` computes
    LayerNorm(dropout(dense(h)) + x) from the FFN input x. There we call `output(h, x + s f(x))`:
    adding s f(x) to the residual is adding it to the FFN's output, before the norm.
    """

    adapter_layer_names = ("adapter",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.adapter = nn.ModuleDict()
        self.scaling: dict[str, float] = {}

    def add_adapter(self, name: str, config: ParallelAdapterConfig) -> None:
        # The block's last linear maps back to the model width d (GPT-2 c_proj, LLaMA down_proj, BERT dense).
        last = [m for m in self.base_layer.modules() if is_linear(m)][-1]
        self.adapter[name] = Bottleneck(linear_shape(last)[1], config, last.weight)
        self.scaling[name] = config.scaling

    def apply_adapter(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        return result + self.scaling[name] * self.adapter[name](x).to(x.dtype)  # (B, T, d)

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        """s f(x) of the active adapters; in a mixed batch, each row's own adapter (none for the base)."""
        return self.adapt(x, torch.zeros_like(x))  # (B, T, d)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args:  # BERT: (intermediate h, FFN input x)
            residual = args[0]  # (B, T, d)
            return self.base_layer(x, residual + self._branch(residual), *args[1:], **kwargs)
        return self.base_layer(x, **kwargs) + self._branch(x)  # (B, T, d)


class AdapterMethod(Method):
    """Targets come from the placement (its roles in core/architectures.py) unless target_modules is given."""

    def targets(self, model: nn.Module, config: AdapterConfig) -> list[str]:
        return find_targets(model, config.target_modules, role_pattern(model, config.sites()))


ADAPTER = register(AdapterMethod(AdapterConfig, SerialAdapterLayer))
PARALLEL_ADAPTER = register(AdapterMethod(ParallelAdapterConfig, ParallelAdapterLayer))
