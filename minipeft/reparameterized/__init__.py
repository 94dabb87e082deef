"""Reparameterized methods: the update is a structured function of few parameters (chapters 02, 07)."""

from .adalora import AdaLoraConfig, AdaLoraLayer, RankAllocator
from .intrinsic import IntrinsicConfig, IntrinsicLayer
from .loha import LoHaConfig, LoHaLayer
from .lokr import LoKrConfig, LoKrLayer
from .lora import LoraConfig, LoraLayer
from .vera import VeraConfig, VeraLayer

__all__ = [
    "AdaLoraConfig",
    "AdaLoraLayer",
    "IntrinsicConfig",
    "IntrinsicLayer",
    "LoHaConfig",
    "LoHaLayer",
    "LoKrConfig",
    "LoKrLayer",
    "LoraConfig",
    "LoraLayer",
    "RankAllocator",
    "VeraConfig",
    "VeraLayer",
]
