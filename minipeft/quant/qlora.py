"""QLoRA: LoRA adapters on a frozen base whose linear weights are stored in NF4
(Dettmers, Pagnoni, Holtzman and Zettlemoyer, 2023, arXiv:2305.14314). Taught in chapter 09.

`Linear4bit` holds a weight as NF4 codes and scales (nf4.py) and dequantizes it for each
matrix product, in the forward pass and again in the backward pass, so that only the 4-bit
codes stay in memory: no full-precision copy is kept for backward. LoRA wraps it like any
linear layer (core/layers.py recognises it by `is_linear_layer`); the adapter trains in
the compute dtype while the base stays frozen.

    mp.get_peft_model(model, mp.LoraConfig(...), quantization=mp.NF4Config())

Merging folds B A into the base and quantizes the sum again: the merged weight is off by up
to half a quantization step per weight, which swallows most of a small update. For an exact
merge, `dequantize_model` first (back to full-precision linears), then merge.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core.config import REGISTRY, PeftConfig, check_field_types
from ..core.inject import replace_module
from ..core.targets import find_targets
from .nf4 import NF4Tensor, quantize_nf4


@dataclass
class NF4Config:
    """How `get_peft_model(..., quantization=NF4Config())` stores the base linears."""

    # Weights per absmax scale; 64 is the QLoRA paper's choice.
    blocksize: int = 64
    # Store the scales in 8 bits (blocks of 256) too: 0.373 bits per weight saved.
    double_quant: bool = True
    # Which linears to quantize: None = the PEFT config's targets; "all-linear" or names as in
    # target_modules (QLoRA quantizes every linear but the output head: "all-linear").
    target_modules: list[str] | str | None = None

    def __post_init__(self) -> None:
        check_field_types(self)

    def targets(self, model: nn.Module, peft_config: PeftConfig) -> list[str]:
        """Names of the linears to quantize (never a module trained in full, `modules_to_save`)."""
        method = REGISTRY[peft_config.peft_type]
        names = find_targets(model, self.target_modules) if self.target_modules else method.targets(model, peft_config)
        trained = set(find_targets(model, peft_config.modules_to_save)) if peft_config.modules_to_save else set()
        return [n for n in names if n not in trained]

    def quantize(self, model: nn.Module, peft_config: PeftConfig) -> None:
        """Replace the chosen linears of `model` by `Linear4bit`, in place."""
        for name in self.targets(model, peft_config):
            module = model.get_submodule(name)
            if not isinstance(module, (nn.Linear, Conv1D)):
                raise TypeError(f"NF4 quantizes nn.Linear or Conv1D layers; {name!r} is a {type(module).__name__}")
            replace_module(model, name, Linear4bit.from_linear(module, self.blocksize, self.double_quant))


class _DequantizedMatmul(torch.autograd.Function):
    """x W^T with W dequantized on the fly; backward dequantizes again instead of saving W."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: Linear4bit) -> torch.Tensor:
        ctx.layer = layer  # the module, not a saved tensor: its codes are the base weights themselves
        return x @ layer.weight.to(x.dtype).T  # (..., out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.weight.to(grad.dtype), None  # (..., in); the codes get no gradient


class Linear4bit(nn.Module):
    """A frozen linear layer stored in NF4 (nn.Linear layout: weight (out, in))."""

    is_linear_layer = True  # the protocol core/layers.py and core/targets.py recognise

    def __init__(self, weight: NF4Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.blocksize, self.double_quant, self.dtype = weight.blocksize, weight.absmax_scale is not None, weight.dtype
        for name, tensor in weight.tensors().items():
            self.register_buffer(f"nf4_{name}", tensor)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, module: nn.Module, blocksize: int = 64, double_quant: bool = True) -> Linear4bit:
        weight = module.weight.T if isinstance(module, Conv1D) else module.weight  # (out, in)
        return cls(quantize_nf4(weight.detach(), blocksize, double_quant), module.bias)

    @property
    def quantized(self) -> NF4Tensor:
        shape = torch.Size((self.out_features, self.in_features))
        scale, offset = getattr(self, "nf4_absmax_scale", None), getattr(self, "nf4_absmax_offset", None)
        return NF4Tensor(self.nf4_packed, self.nf4_absmax, shape, self.dtype, self.blocksize, scale, offset)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (out, in): computed on each access, never stored."""
        return self.quantized.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _DequantizedMatmul.apply(x, self)  # (..., out)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    @torch.no_grad()
    def add_to_weight(self, delta: torch.Tensor) -> None:
        """W <- NF4(W + delta): how a LoRA update is merged into a 4-bit base (re-rounded)."""
        warnings.warn(
            "merging into a 4-bit base quantizes W + BA again: each weight moves by up to half an NF4 step, "
            "more than most of the update; call minipeft.quant.dequantize_model() first for an exact merge",
            stacklevel=3,
        )
        merged = quantize_nf4(self.weight + delta.to(self.dtype), self.blocksize, self.double_quant)
        for name, tensor in merged.tensors().items():
            setattr(self, f"nf4_{name}", tensor)

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, NF4 blocksize={self.blocksize}{dq}"


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every `Linear4bit` (also inside adapter wrappers) by an nn.Linear holding its dequantized weight."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Linear4bit):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.to(device=module.nf4_packed.device, dtype=module.dtype).requires_grad_(False)
            linear.weight.data = module.weight
            if module.bias is not None:
                linear.bias.data = module.bias.data.clone()
            replace_module(model, name, linear)
    return model
