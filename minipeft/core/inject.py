"""Injection: one loop for every method. Resolve the config, find the targets, wrap each target
once in the method's layer class and give it the named adapter, then let the method link its
layers (ARCHITECTURE.md). A module already wrapped by the same method gets one more named
adapter; a module wrapped by another method is wrapped again, which is how methods compose.

Validate before mutate: every target is checked before the first module is replaced, and if
anything fails after that, every wrapper and adapter added so far is taken out again, so a failed
call leaves the model exactly as it was. Taught in chapter 02.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import REGISTRY, PeftConfig
from .layers import ModulesToSaveWrapper, innermost
from .targets import find_targets
from .wrapper import AdapterWrapper


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The parent module of `name` and the attribute under which it holds it."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, child = get_submodule_parent(model, name)
    setattr(parent, child, new)


def _check_targets(model: nn.Module, names: list[str], layer_cls: type, adapter_name: str) -> None:
    """Refuse, before any change, a target the layer class cannot wrap or that has the adapter already."""
    wrong, taken = {}, []
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, layer_cls):
            if adapter_name in module.adapter_names():
                taken.append(name)
        elif not layer_cls.can_wrap(module):
            wrong[name] = type(innermost(module)).__name__
    if taken:
        raise ValueError(f"modules {taken[:5]} already have an adapter named {adapter_name!r}")
    if wrong:
        raise TypeError(
            f"{layer_cls.__name__} adapts {layer_cls.wraps()}; these targets are not: {wrong}. "
            "Choose target_modules among the supported layers"
        )


def inject_adapter(
    model: nn.Module, config: PeftConfig, adapter_name: str, fill: Callable[[], None] | None = None
) -> PeftConfig:
    """Add the adapter `config` describes to `model` under `adapter_name`; returns the resolved config.
    `fill()`, if given, runs last (loading the adapter's tensors from a file). All or nothing: on any
    error, `fill`'s included, the model is left as it was."""
    wrapped: list[tuple[str, nn.Module]] = []  # (name, module it replaced), to undo on failure
    holders: list[AdapterWrapper] = []  # wrappers that got the adapter, to undo on failure
    try:
        config = _inject(model, config, adapter_name, wrapped, holders)
        if fill is not None:
            fill()
    except BaseException:
        for holder in holders:
            if adapter_name in holder.adapter_names():
                holder.delete_adapter(adapter_name)
        for name, module in reversed(wrapped):
            replace_module(model, name, module)
        raise
    return config


def _inject(
    model: nn.Module, config: PeftConfig, adapter_name: str, wrapped: list, holders: list[AdapterWrapper]
) -> PeftConfig:
    """The steps of ARCHITECTURE.md for one method; a hybrid's parts in turn, under the same name.
    Records in `wrapped` and `holders` what it changed, for `inject_adapter` to undo on failure."""
    method = REGISTRY[config.peft_type]
    parts = method.parts(config)
    if parts is not None:
        for part in parts:  # each part is checked before its first change, and undone with the rest on failure
            _inject(model, part, adapter_name, wrapped, holders)
        return method.resolve(model, config)
    names = method.targets(model, config)
    _check_targets(model, names, method.layer_cls, adapter_name)
    config = method.resolve(model, config)
    if getattr(config, "fan_in_fan_out", None) is False and any(
        isinstance(innermost(model.get_submodule(n)), Conv1D) for n in names
    ):  # recorded for peft, which reads from the file that GPT-2's Conv1D stores its weight as (in, out)
        config = dataclasses.replace(config, fan_in_fan_out=True)
    saves = find_targets(model, config.modules_to_save) if config.modules_to_save else []
    layers = {}
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, method.layer_cls):
            layer = method.layer_cls(module).train(module.training)
            replace_module(model, name, layer)
            wrapped.append((name, module))
            module = layer
        module.add_adapter(adapter_name, config.for_module(name))
        holders.append(module)
        layers[name] = module
    method.link(model, config, adapter_name, layers)
    for name in saves:
        module = model.get_submodule(name)
        if not isinstance(module, ModulesToSaveWrapper):
            layer = ModulesToSaveWrapper(module)
            replace_module(model, name, layer)
            wrapped.append((name, module))
            module = layer
        module.add_adapter(adapter_name)
        holders.append(module)
    return config


def adapter_parameters(model: nn.Module, adapter_name: str, buffers: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor that belongs to one adapter, under its file key (peft's: the module path and the
    parameter path with the adapter's own level left out; a `modules_to_save` copy under the module's
    own name). Built from the parts, so any adapter name works, also one equal to a module name.
    With buffers=True also the adapter's buffers: saved state that does not train (a sparse update's indices).
    A wrapper inside another (a module wrapped by two methods) keys its tensors by the outer one's module
    path, so an adapter's file does not depend on what wrapped its layers after it."""
    out = {}
    site: dict[int, str] = {}  # id of a wrapper's base_layer -> the module path its tensors are saved under
    for module_name, module in model.named_modules():  # outer wrappers come before the ones they wrap
        if not isinstance(module, AdapterWrapper):
            continue
        module_name = site.get(id(module), module_name)
        if hasattr(module, "base_layer"):
            site[id(module.base_layer)] = module_name
        attrs = getattr(module, "adapter_layer_names", ("modules_to_save",))
        for attr in attrs:
            holder = getattr(module, attr)
            if adapter_name not in holder:
                continue
            entry = holder[adapter_name]
            prefix = module_name if attr == "modules_to_save" else f"{module_name}.{attr}"
            if isinstance(entry, nn.Parameter):
                out[prefix] = entry
            else:
                tensors = [*entry.named_parameters(), *(entry.named_buffers() if buffers else [])]
                for pname, p in tensors:
                    out[f"{prefix}.{pname}"] = p
    return out


def upcast_adapter(model: nn.Module, adapter_name: str) -> None:
    """peft's `autocast_adapter_dtype`: an adapter made on a float16/bfloat16 base holds float32 tensors, which
    train stably; each layer casts its input to them and its output back. Copies of whole modules
    (`modules_to_save`) keep the base's dtype, as in peft."""
    for module in model.modules():
        if not isinstance(module, AdapterWrapper) or isinstance(module, ModulesToSaveWrapper):
            continue
        for attr in module.adapter_layer_names:
            holder = getattr(module, attr)
            entry = holder[adapter_name] if adapter_name in holder else None
            tensors = [entry] if isinstance(entry, torch.Tensor) else [] if entry is None else entry.parameters()
            for t in tensors:
                if t.dtype in (torch.float16, torch.bfloat16):
                    t.data = t.data.float()


def set_trainable(model: nn.Module, adapter_names: list[str]) -> None:
    """Freeze everything, then unfreeze the parameters of the named adapters."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name in adapter_names:
        for p in adapter_parameters(model, name).values():
            p.requires_grad_(True)


def set_active(model: nn.Module, names: list[str]) -> None:
    for module in model.modules():
        if isinstance(module, AdapterWrapper):
            module.active_adapters = list(names)
