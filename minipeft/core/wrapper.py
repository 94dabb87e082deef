"""`AdapterWrapper`: the base class of every module that wraps a base module and holds adapters by
name. It sits below the rest of `core/` (target matching must recognise wrappers; the layers build on
them). See ARCHITECTURE.md for the contracts. Taught in chapter 02.
"""

from __future__ import annotations

import torch
from torch import nn


class AdapterWrapper(nn.Module):
    """Anything that wraps a base module and holds adapters keyed by name."""

    def __init__(self) -> None:
        super().__init__()
        self.active_adapters: list[str] = ["default"]  # which adapters run in forward, in this order
        self.disabled = False  # True inside PeftModel.disable_adapter()
        self.row_adapters: list[str] | None = None  # mixed batch: one adapter name per row (PeftModel.forward)

    def adapter_names(self) -> list[str]:
        raise NotImplementedError

    def delete_adapter(self, name: str) -> None:
        raise NotImplementedError


def rows_of(names: list[str], x: torch.Tensor) -> dict[str, list[int]]:
    """Mixed batch: the rows of x that use each adapter name (one name per row)."""
    if x.shape[0] != len(names):
        raise ValueError(
            f"mixed batch: {len(names)} adapter names for an input of shape {tuple(x.shape)}; "
            f"give one adapter name (or '__base__') per row, {x.shape[0]} here"
        )
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name, []).append(i)
    return groups
