"""Injection: replace targeted modules by wrappers, and decide what trains.

Taught in chapter 02. A module that is already wrapped by the same method gets one
more named adapter; a module wrapped by another method is wrapped again, which is how
methods compose (chapter 08).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import Method, PeftConfig
from .layers import AdapterWrapper, ModulesToSaveWrapper
from .targets import find_targets


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The parent module of `name` and the attribute under which it holds it."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, child = get_submodule_parent(model, name)
    setattr(parent, child, new)


def wrap_targets(model: nn.Module, config: PeftConfig, adapter_name: str, method: Method) -> None:
    """Wrap every targeted module in `method.layer_cls` and add the named adapter to it."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for name in find_targets(model, config.target_modules, method.default_targets.get(model_type)):
        module = model.get_submodule(name)
        if not isinstance(module, method.layer_cls):
            module = method.layer_cls(module)
            replace_module(model, name, module)
        if adapter_name in module.adapter_names():
            raise ValueError(f"module {name!r} already has an adapter named {adapter_name!r}")
        module.add_adapter(adapter_name, config)


def wrap_modules_to_save(model: nn.Module, names: list[str] | None, adapter_name: str) -> None:
    """Give each module named in `modules_to_save` a trainable copy for this adapter."""
    for name in find_targets(model, names) if names else []:
        module = model.get_submodule(name)
        if not isinstance(module, ModulesToSaveWrapper):
            module = ModulesToSaveWrapper(module)
            replace_module(model, name, module)
        module.add_adapter(adapter_name)


def adapter_parameters(model: nn.Module, adapter_name: str, buffers: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter that belongs to one adapter: `<...>.<adapter dict>.<adapter_name>.<...>`.
    With buffers=True also its buffers: saved state that does not train (a sparse update's indices)."""
    out = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, AdapterWrapper):
            continue
        attrs = getattr(module, "adapter_layer_names", ("modules_to_save",))
        for attr in attrs:
            holder = getattr(module, attr)
            if adapter_name not in holder:
                continue
            entry = holder[adapter_name]
            if isinstance(entry, nn.Parameter):
                out[f"{module_name}.{attr}.{adapter_name}"] = entry
            else:
                tensors = [*entry.named_parameters(), *(entry.named_buffers() if buffers else [])]
                for pname, p in tensors:
                    out[f"{module_name}.{attr}.{adapter_name}.{pname}"] = p
    return out


def set_trainable(model: nn.Module, adapter_name: str) -> None:
    """Freeze everything, then unfreeze the parameters of one adapter."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in adapter_parameters(model, adapter_name).values():
        p.requires_grad_(True)


def set_active(model: nn.Module, names: list[str]) -> None:
    for module in model.modules():
        if isinstance(module, AdapterWrapper):
            module.active_adapters = list(names)
