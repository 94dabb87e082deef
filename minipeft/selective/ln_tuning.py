"""LayerNorm tuning: train only the normalisation layers' gains and shifts (LayerNorm:
gamma and beta; RMSNorm: its gain). Zhao et al. (2024, "Tuning LayerNorm in Attention",
arXiv:2312.11420) found it competitive with LoRA when turning language models into multi-modal
ones, at a fraction of the parameters; HF peft has it as `LNTuningConfig`. Taught in chapter 06.

Each targeted norm's parameters get a trainable delta; everything else stays frozen. The count
is 2d per LayerNorm (d for an RMSNorm, which has no shift). HF peft trains a copy of each norm
instead of a delta: the same function and the same count. Default targets: every module whose
class is a norm (LayerNorm, RMSNorm and the per-model variants such as LlamaRMSNorm).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..core.config import Method, PeftConfig, register
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


# Each norm's gain (and shift) gets a dense delta: DeltaLayer's default.
LN_TUNING = register(LNTuningMethod(LNTuningConfig, DeltaLayer))
