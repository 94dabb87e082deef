"""minipeft: Parameter-Efficient Fine-Tuning from scratch, the library of the book.

Flat public API; names mirror HF peft so that readers graduate to it without relearning.
"""

from .additive import (
    AdapterConfig,
    IA3Config,
    ParallelAdapterConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    fold_prompt_encoder,
)
from .core import PeftConfig, PeftModel, get_peft_model
from .hybrid import (
    CompacterConfig,
    FusionConfig,
    LoraHubResult,
    MAMConfig,
    UniPELTConfig,
    gate_values,
    lorahub,
    value_regularization,
)
from .quant import NF4Config
from .reparameterized import (
    AdaLoraConfig,
    IntrinsicConfig,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    RankAllocator,
    VeraConfig,
)
from .selective import (
    BitFitConfig,
    DiffPruningConfig,
    FishMaskConfig,
    LNTuningConfig,
    PartialConfig,
    project_to_budget,
    select_by_fisher,
)

__version__ = "0.1.0"

__all__ = [
    "AdaLoraConfig",
    "AdapterConfig",
    "BitFitConfig",
    "CompacterConfig",
    "DiffPruningConfig",
    "FishMaskConfig",
    "FusionConfig",
    "IA3Config",
    "IntrinsicConfig",
    "LNTuningConfig",
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "LoraHubResult",
    "MAMConfig",
    "NF4Config",
    "PTuningConfig",
    "ParallelAdapterConfig",
    "PartialConfig",
    "PeftConfig",
    "PeftModel",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "RankAllocator",
    "UniPELTConfig",
    "VeraConfig",
    "fold_prompt_encoder",
    "gate_values",
    "get_peft_model",
    "lorahub",
    "project_to_budget",
    "select_by_fisher",
    "value_regularization",
]
