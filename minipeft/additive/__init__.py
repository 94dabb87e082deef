"""Additive methods: new trainable modules or inputs next to a frozen model (chapters 03-05)."""

from .adapters import AdapterConfig, ParallelAdapterConfig
from .ia3 import IA3Config
from .p_tuning import PTuningConfig
from .prefix_tuning import PrefixTuningConfig
from .prompt_tuning import PromptTuningConfig
from .prompts import fold_prompt_encoder

__all__ = [
    "AdapterConfig",
    "IA3Config",
    "PTuningConfig",
    "ParallelAdapterConfig",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "fold_prompt_encoder",
]
