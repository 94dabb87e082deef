"""The hybrid family and composition (chapter 08): methods made of other methods (MAM, UniPELT),
Compacter's hypercomplex adapters, AdapterFusion over trained adapters, weighted merges of LoRA
adapters (`PeftModel.add_weighted_adapter`, registered by `merging`) and LoraHub's gradient-free
search of the merge weights (`lorahub`)."""

from .compacter import CompacterConfig
from .fusion import FusionConfig, value_regularization
from .lorahub import LoraHubResult, lorahub
from .mam import MAMConfig
from .merging import COMBINATION_TYPES, add_weighted_adapter
from .unipelt import UniPELTConfig, gate_values

__all__ = [
    "COMBINATION_TYPES",
    "CompacterConfig",
    "FusionConfig",
    "LoraHubResult",
    "MAMConfig",
    "UniPELTConfig",
    "add_weighted_adapter",
    "gate_values",
    "lorahub",
    "value_regularization",
]
