"""The mechanism every method shares: configs and registry, targets, injection, wrapper
layers, the PeftModel and adapter files."""

from .config import REGISTRY, Method, PeftConfig, register
from .layers import AdapterWrapper, ModulesToSaveWrapper, TunerLayer, linear_shape
from .model import PeftModel, get_peft_model
from .targets import find_targets, is_linear

__all__ = [
    "REGISTRY",
    "AdapterWrapper",
    "Method",
    "ModulesToSaveWrapper",
    "PeftConfig",
    "PeftModel",
    "TunerLayer",
    "find_targets",
    "get_peft_model",
    "is_linear",
    "linear_shape",
    "register",
]
