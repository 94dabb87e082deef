"""Combining trained adapters: weighted merges of LoRA adapters (`PeftModel.add_weighted_adapter`,
registered by `merging`) and LoraHub's gradient-free search of the merge weights (`lorahub`)."""

from .lorahub import LoraHubResult, lorahub
from .merging import COMBINATION_TYPES, add_weighted_adapter

__all__ = ["COMBINATION_TYPES", "LoraHubResult", "add_weighted_adapter", "lorahub"]
