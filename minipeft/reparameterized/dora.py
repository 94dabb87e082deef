"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., 2024, arXiv:2402.09353).
Taught in chapter 07. Switched on with `LoraConfig(use_dora=True)`; `LoraLayer` delegates here.

DoRA splits every output unit's weight row into a magnitude and a direction, trains the
magnitude `m` directly and the direction with LoRA:

    W' = m * (W0 + s B A) / n,    n = ||W0 + s B A|| per output row (d_out,),  m starts at ||W0|| per row

so the model starts exactly at the base model. As the paper suggests (section 4.3), `n` is
treated as a constant in the backward pass (detached): its value follows the update, but no
gradient flows through it, which saves memory and barely changes accuracy.

The update `W' - W0` is a full matrix, so DoRA merges like LoRA. Because it depends on W0,
unmerging needs the norm `n` of the moment of merging, which is cached then.
The magnitude is saved under HF peft's key `lora_magnitude_vector`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core import layer_types
from ..core.layers import TunerLayer, innermost


def base_weight(layer: TunerLayer) -> torch.Tensor:
    """The frozen base weight as a matrix (d_out, fan_in), whatever the module stores (core/layer_types.py)."""
    return layer_types.weight_matrix(innermost(layer))


def lora_weight(layer: TunerLayer, name: str) -> torch.Tensor:
    """s * B A: the LoRA part of the direction, (d_out, fan_in)."""
    a, b = layer.factors(name)
    return b @ a * layer.scaling[name]


def row_norm(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of every output row of a (d_out, fan_in) weight: (d_out,)."""
    return torch.linalg.vector_norm(weight, dim=1)


@torch.no_grad()
def init_magnitude(layer: TunerLayer, name: str) -> None:
    """m = ||W0 + s B A|| per row, so that W' = W0 at initialisation (B = 0 or not).
    Stored as peft stores it: (d_out,), or (1, d_out, 1, ...) for a convolution."""
    norm = row_norm(base_weight(layer) + lora_weight(layer, name))  # (d_out,)
    shape = layer_types.feature_param_shape(innermost(layer), norm.shape[0]) or norm.shape
    layer.lora_magnitude_vector[name] = nn.Parameter(norm.reshape(shape).clone())


def scale(layer: TunerLayer, name: str, w0: torch.Tensor) -> torch.Tensor:
    """m / n with n detached (paper, section 4.3): (d_out,)."""
    norm = row_norm(w0 + lora_weight(layer, name)).detach()  # (d_out,)
    return layer.lora_magnitude_vector[name].reshape(-1) / norm


def apply(layer: TunerLayer, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
    """W' x + b = result + (m/n - 1) * W0 x + (m/n) * s B A x, reusing W0 x + b from `result`."""
    base = innermost(layer)
    w0 = base_weight(layer)  # (d_out, fan_in)
    factor = layer_types.per_feature(base, scale(layer, name, w0), result.dim())  # (d_out,) on the feature axis
    x_adapter = layer.adapter_input(x, name)  # dropout applied (when training), adapter dtype
    if isinstance(layer.lora_dropout[name], nn.Identity) or not layer.training:
        bias = getattr(base, "bias", None)  # an embedding has none
        w0_x = result if bias is None else result - layer_types.per_feature(base, bias, result.dim())  # W0 x
    else:  # dropout acts on the adapter's input: the rescaled base term must see the same input
        w0_x = layer_types.apply_weight(base, x_adapter, w0.to(x_adapter.dtype))
    update = layer.lora_update(x_adapter, name)  # s B A x, like result
    return result + ((factor - 1) * w0_x + factor * update).to(result.dtype)


def delta_weight(layer: TunerLayer, name: str) -> torch.Tensor:
    """W' - W0 = (m/n - 1) * W0 + (m/n) * s B A (rows scaled), (d_out, fan_in).

    While merged, the stored weight is W' itself; W0 is recovered from it with the norm cached
    at merge time (n cannot be recomputed from W', whose rows all have norm m).
    """
    cache = vars(layer).setdefault("dora_norm_at_merge", {})
    magnitude = layer.lora_magnitude_vector[name].detach().reshape(-1, 1)  # (d_out, 1)
    update = lora_weight(layer, name)  # (d_out, fan_in)
    if name in layer.merged_adapters:  # unmerging: the base holds W' = (m/n) (W0 + s B A)
        merged = base_weight(layer)
        w0 = merged * (cache[name] / magnitude) - update
        return merged - w0
    w0 = base_weight(layer)
    norm = row_norm(w0 + update).unsqueeze(1)  # (d_out, 1)
    cache[name] = norm.detach()
    return (magnitude / norm - 1) * w0 + (magnitude / norm) * update
