"""Triton kernels for LoRA (chapters 10 and 11): tensor functions, and the rule for when they run.

`LoraConfig(kernel=...)`: "torch" always runs plain PyTorch; "triton" runs the kernels
and fails with a clear message where they cannot run; "auto" runs them on CUDA tensors
when triton is installed and PyTorch elsewhere. This package knows no PEFT method: which LoRA
adapters go through the kernels is decided in `reparameterized/lora_kernels.py`. The Triton modules (`lora_triton`,
`multi_lora`, `launch`) are imported on first use, so minipeft imports without triton (macOS,
Windows), and TRITON_INTERPRET=1 (Triton's CPU interpreter) may be set any time before
the first kernel call. `reference` holds the plain-torch references they are checked against.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

KERNELS = ("auto", "torch", "triton")


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def check_triton(x: torch.Tensor) -> None:
    """Raise a clear error if the Triton kernels cannot run on x's device."""
    if not triton_installed():
        raise RuntimeError(
            "kernel='triton' needs the triton package (Linux only: pip install 'minipeft[triton]'); "
            "use LoraConfig(kernel='torch') or kernel='auto', which falls back to PyTorch"
        )
    if x.is_cuda:
        return
    from .launch import INTERPRETED

    if not INTERPRETED:
        raise RuntimeError(
            f"kernel='triton' got tensors on {x.device}, but Triton kernels need a CUDA GPU or Triton's CPU "
            "interpreter: set TRITON_INTERPRET=1 before minipeft's kernels are first used (they were defined "
            "without it). Or use kernel='auto', which runs PyTorch on a CPU"
        )


def use_triton(kernel: str, x: torch.Tensor) -> bool:
    """Whether a layer with this `kernel` setting runs Triton on input x."""
    if kernel == "torch":
        return False
    if kernel == "auto":
        return x.is_cuda and triton_installed()
    check_triton(x)
    return True


def set_kernel(model: nn.Module, kernel: str) -> None:
    """Switch every LoRA adapter of a (Peft)model to `kernel` ("auto", "torch" or "triton"), e.g. after loading."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    for config in getattr(model, "peft_config", {}).values():
        if hasattr(config, "kernel"):
            config.kernel = kernel
    for layer in model.modules():
        if isinstance(getattr(layer, "kernel", None), dict):  # LoRA layers: one `kernel` setting per adapter
            layer.kernel = dict.fromkeys(layer.kernel, kernel)
