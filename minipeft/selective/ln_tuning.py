"""LayerNorm tuning: train only the normalisation layers' gains and shifts (LayerNorm:
gamma and beta; RMSNorm: its gain). Zhao et al. (2024, "Tuning LayerNorm in Attention",
arXiv:2312.11420) found it competitive with LoRA when turning language models into multi-modal
ones, at a fraction of the parameters; HF peft has it as `LNTuningConfig`. Taught in chapter 06.

Each targeted norm's parameters get a trainable delta; everything else stays frozen. The count
is 2d per LayerNorm (d for an RMSNorm, which has no shift). HF peft trains a copy of each norm
instead of a delta: the same function and the same count. Files are peft's: they hold each norm's
new parameters (base + delta, under `ln_tuning_layers`), so they load both ways. Default targets:
every module whose class is a norm (LayerNorm, RMSNorm and the per-model variants such as LlamaRMSNorm).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import Method, PeftConfig, register
from ..core.io import PREFIX
from ..core.layers import innermost
from ..core.targets import find_targets
from .deltas import DeltaLayer, outer_modules


@dataclass
class LNTuningConfig(PeftConfig):
    peft_type = "LN_TUNING"
    # True: the deltas start at zero (the base model); False: random (tests need a non-zero update).
    init_weights: bool = True


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer with parameters: LayerNorm, RMSNorm, LlamaRMSNorm, T5LayerNorm..."""
    module = innermost(module)
    return "norm" in type(module).__name__.lower() and any(True for _ in module.parameters(recurse=False))


class LNTuningMethod(Method):
    def targets(self, model: nn.Module, config: LNTuningConfig) -> list[str]:
        """Every norm, or those of `target_modules` (each must be one)."""
        norms = [n for n, m in outer_modules(model, config.modules_to_save).items() if is_norm(m)]
        names = norms if config.target_modules is None else find_targets(model, config.target_modules)
        wrong = [n for n in names if n not in norms]
        if wrong or not names:
            raise ValueError(
                f"LN tuning trains normalisation layers; {wrong[:5] or 'nothing'} matched instead. "
                f"Norms of {type(model).__name__}: {sorted({n.split('.')[-1] for n in norms})}"
            )
        return names


    def to_file(self, model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """peft's form: each norm's parameters as trained (base + delta), `<norm>.ln_tuning_layers.<param>`."""
        return _convert(model, tensors, r"(.*)\.selective_delta\.(weight|bias)\.delta", "ln_tuning_layers.{}", +1)

    def from_file(
        self, model: nn.Module, config: LNTuningConfig, tensors: dict[str, torch.Tensor]
    ) -> tuple[LNTuningConfig, dict[str, torch.Tensor]]:
        """A norm's trained parameters become its delta from this model's base."""
        pattern = r"(.*)\.ln_tuning_layers\.(weight|bias)"
        return config, _convert(model, tensors, pattern, "selective_delta.{}.delta", -1)


def _convert(model: nn.Module, tensors: dict, pattern: str, key: str, sign: int) -> dict[str, torch.Tensor]:
    """Rewrite the keys that match `pattern` (groups: the file's module key, the parameter) as `key`, adding
    (sign +1) or subtracting (-1) the base parameter: the norm's base without any adapter merged into it."""
    out = {}
    for name, value in tensors.items():
        match = re.fullmatch(pattern, name)
        if match is None:
            out[name] = value
            continue
        site, param = match.groups()
        try:
            module = model.get_submodule(site.removeprefix(PREFIX))
            base = getattr(innermost(module), param).detach()
        except AttributeError:  # not a norm of this model: load_tensors names the key that does not fit
            out[name] = value
            continue
        if base.shape != value.shape:  # a base of another shape: load_tensors says which key and shapes
            out[f"{site}.{key.format(param)}"] = value
            continue
        while not isinstance(module, DeltaLayer) and hasattr(module, "base_layer"):
            module = module.base_layer
        if isinstance(module, DeltaLayer):  # take out what merged adapters added to the base
            merged = [m for m in module.merged_adapters if param in module.selective_delta[m]]
            base = base - sum(module.delta(m, param) for m in merged)
        out[f"{site}.{key.format(param)}"] = value.detach() + sign * base.to(value.dtype)
    return out

# Each norm's gain (and shift) gets a dense delta: DeltaLayer's default.
LN_TUNING = register(LNTuningMethod(LNTuningConfig, DeltaLayer))
