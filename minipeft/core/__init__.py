"""The mechanism every method shares: configs and registry, the architectures table, targets,
injection, wrapper layers, the PeftModel and adapter files. ARCHITECTURE.md says how they fit."""

from .architectures import ARCHITECTURES, model_type, role_pattern
from .config import REGISTRY, Method, PeftConfig, register
from .inject import inject_adapter
from .layers import ModulesToSaveWrapper, TunerLayer, linear_shape
from .model import PeftModel, get_peft_model
from .targets import find_targets, is_linear
from .wrapper import AdapterWrapper

__all__ = [
    "ARCHITECTURES",
    "REGISTRY",
    "AdapterWrapper",
    "Method",
    "ModulesToSaveWrapper",
    "PeftConfig",
    "PeftModel",
    "TunerLayer",
    "find_targets",
    "get_peft_model",
    "inject_adapter",
    "is_linear",
    "linear_shape",
    "model_type",
    "register",
    "role_pattern",
]
