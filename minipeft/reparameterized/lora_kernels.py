"""Which LoRA adapters run through the Triton kernels (chapters 10, 11), and the calls that run them.

`LoraLayer.forward` asks `lora_forward` first and a mixed batch asks `lora_rows`; both return None
where the layer should take its plain PyTorch path. The kernels themselves (`minipeft.kernels`) are
tensor functions that know nothing of LoRA layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..kernels import use_triton


def _fusable(layer, name: str, x: torch.Tensor) -> bool:
    """Whether the kernels should compute this adapter. Never for what they do not compute (DoRA, dropout
    while training, a wrapped base); under "auto" also not for a trainable base or mixed dtypes, which
    the kernels refuse with a clear error when asked for explicitly with "triton"."""
    dropout = layer.training and not isinstance(layer.lora_dropout[name], nn.Identity)
    if name in layer.lora_magnitude_vector or dropout or not isinstance(layer.base_layer, (nn.Linear, Conv1D)):
        return False
    if layer.kernel[name] == "triton":
        return True
    base_trains = torch.is_grad_enabled() and any(p.requires_grad for p in layer.base_layer.parameters())
    return not base_trains and x.dtype == layer.weight.dtype == layer.lora_A[name].weight.dtype


def lora_forward(layer, x: torch.Tensor, extra: bool) -> torch.Tensor | None:
    """`LoraLayer.forward` through the fused kernel, or None where the layer takes the torch path:
    disabled, mixed batch, extra forward arguments, not exactly one active unmerged adapter,
    "auto" off CUDA, or an adapter the kernel should not compute (see `_fusable`)."""
    if extra or layer.disabled or layer.row_adapters is not None:
        return None
    names = layer.unmerged_active()
    if len(names) != 1 or not _fusable(layer, names[0], x) or not use_triton(layer.kernel[names[0]], x):
        return None
    from ..kernels.lora_triton import fused_lora_linear

    name, base = names[0], layer.base_layer
    weight = base.weight.T if layer.fan_in_fan_out else base.weight  # (d_out, d_in): Conv1D stores (d_in, d_out)
    lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    return fused_lora_linear(x, weight, base.bias, lora_a, lora_b, layer.scaling[name])


def lora_rows(layer, x: torch.Tensor, result: torch.Tensor, names: list[str]) -> torch.Tensor | None:
    """A mixed batch through the gathered kernel (row i uses adapter names[i]), or None for the torch path."""
    adapters = [n for n in dict.fromkeys(names) if n in layer.lora_A]
    if not adapters or not all(_fusable(layer, n, x) for n in adapters):
        return None
    if not all(use_triton(layer.kernel[n], x) for n in adapters):
        return None
    from ..kernels.multi_lora import multi_lora

    rank = max(layer.lora_A[n].weight.shape[0] for n in adapters)
    a_stack = torch.stack(
        [F.pad(layer.lora_A[n].weight, (0, 0, 0, rank - layer.lora_A[n].weight.shape[0])) for n in adapters]
    )  # (L, r_max, d_in): smaller ranks padded with zero rows
    b_stack = torch.stack(
        [F.pad(layer.lora_B[n].weight, (0, rank - layer.lora_B[n].weight.shape[1])) for n in adapters]
    )  # (L, d_out, r_max): ... and zero columns
    scalings = torch.tensor([layer.scaling[n] for n in adapters], device=x.device)  # (L,)
    indices = torch.tensor([adapters.index(n) if n in adapters else -1 for n in names], device=x.device)  # (B,)
    return multi_lora(x, indices, a_stack.to(x.dtype), b_stack.to(x.dtype), scalings, base=result)
