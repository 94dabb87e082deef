"""BitFit: train the bias terms only (Ben Zaken, Ravfogel and Goldberg, 2022, "BitFit: Simple
Parameter-efficient Fine-tuning for Transformer-based Masked Language-models",
arXiv:2106.10199). Taught in chapter 06.

Every bias b of the model (or of the modules named in `target_modules`) gets a trainable delta,
b -> b + delta_b; weights stay frozen. The paper trains all biases (linear layers and LayerNorms)
plus the new classifier, and finds that the query and middle-of-MLP biases alone come close:
`target_modules=["query", "intermediate.dense"]` on BERT, `["c_attn", "c_fc"]` on GPT-2 (whose
fused c_attn bias holds the query, key and value biases). The count is the closed form
sum over biases of their length. Models without biases (LLaMA-style) are refused: there is
nothing to train.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..core.config import Method, PeftConfig, register
from ..core.layers import innermost
from ..core.targets import find_targets
from .deltas import DeltaLayer, DenseDelta, outer_modules


@dataclass
class BitFitConfig(PeftConfig):
    peft_type = "BITFIT"
    # True: the bias deltas start at zero (the base model); False: random (tests need a non-zero update).
    init_weights: bool = True


def modules_with_bias(model: nn.Module, exclude: list[str] | None = None) -> list[str]:
    """Names of the modules that hold a bias parameter (linears, Conv1D, LayerNorms...)."""
    return [
        n
        for n, m in outer_modules(model, exclude).items()
        if isinstance(getattr(innermost(m), "bias", None), nn.Parameter)
    ]


class BitFitLayer(DeltaLayer):
    """A module whose bias gets a trainable delta."""

    def new_entries(self, config: BitFitConfig) -> dict[str, nn.Module]:
        return {"bias": DenseDelta(innermost(self).bias, config.init_weights)}


class BitFitMethod(Method):
    def targets(self, model: nn.Module, config: BitFitConfig) -> list[str]:
        """Every module with a bias, or those of `target_modules` (each must have one)."""
        with_bias = modules_with_bias(model, config.modules_to_save)
        if not with_bias:
            raise ValueError(
                f"BitFit: {type(model).__name__} has no bias parameters (LLaMA-style models drop the biases of "
                "their linear layers and norms), so BitFit has nothing to train. Use LNTuningConfig (the norm "
                "gains), IA3Config or LoraConfig instead"
            )
        names = with_bias if config.target_modules is None else find_targets(model, config.target_modules)
        missing = [n for n in names if n not in with_bias]
        if missing:
            raise ValueError(
                f"BitFit trains biases, but {missing[:5]} have none. Modules with a bias: "
                f"{sorted({n.split('.')[-1] for n in with_bias})}"
            )
        return names


BITFIT = register(BitFitMethod(BitFitConfig, BitFitLayer))
