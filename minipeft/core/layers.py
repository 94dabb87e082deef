"""The shared wrapper layers: `TunerLayer` (a base module plus named adapters) and
`ModulesToSaveWrapper` (a trainable copy of a whole module, e.g. a new head).

Merge, unmerge and disable are written once here, over each method's
`delta_weight(name)`; a method only says what its update is, as a matrix in nn.Linear's
layout, and `core/layer_types.py` lays it out as each layer type stores its weight (GPT-2's
transposed `Conv1D`, embeddings, convolutions).
Taught in chapter 02.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from . import layer_types
from .targets import is_linear
from .wrapper import AdapterWrapper, rows_of


def innermost(module: nn.Module) -> nn.Module:
    """The plain base module under any number of wrappers."""
    while isinstance(module, TunerLayer):
        module = module.base_layer
    return module


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of the adaptable layer under any wrappers: features, channels, or
    (num_embeddings, embedding_dim) (core/layer_types.py)."""
    return layer_types.features(innermost(module))


def check_rank(layer: TunerLayer, r: int, method: str) -> None:
    """A rank above min(d_out, fan_in) of the weight matrix adds parameters but no expressiveness: warn.
    peft accepts such a rank, so files trained with it must load here too; refusing would strand them."""
    d_out, fan_in = layer_types.matrix_shape(innermost(layer))
    limit = min(d_out, fan_in)
    if r > limit:
        warnings.warn(
            f"{method} rank r={r} exceeds min(d_out, fan_in) = min({d_out}, {fan_in}) of this "
            f"{type(innermost(layer)).__name__}; a rank above that adds parameters but no expressiveness "
            f"(r <= {limit} gives the same updates)",
            stacklevel=2,
        )


class TunerLayer(AdapterWrapper):
    """A base module plus named adapters. Subclasses implement:

    - `add_adapter(name, config)`: create the adapter's parameters;
    - `apply_adapter(x, result, name)`: the adapted output, given the input and the
      output so far (additive methods return `result + ...`, (IA)^3 `result * ...`);
    - `delta_weight(name)`, only if the method can merge: the update in nn.Linear
      layout (d_out, fan_in) (core/layer_types.py), so that the merged weight is W + delta_weight;
      and `delta_bias(name)` if the method also changes the base bias (chapter 06).
    """

    # Attributes that are dicts keyed by adapter name (saved, deleted, made trainable).
    adapter_layer_names: tuple[str, ...] = ()
    # True: merge() keeps the base entries it overwrites and unmerge() puts them back bit-exactly
    # (cheap when the update is sparse or a vector, chapter 06); False: unmerge() subtracts.
    exact_unmerge: bool = False
    # What this layer can wrap (the innermost base module); None: any module (adapters wrap whole blocks).
    # With nn.Linear listed, every linear `is_linear` knows is accepted too (chapter 09's 4-bit base).
    base_types: tuple[type[nn.Module], ...] | None = None

    @classmethod
    def can_wrap(cls, module: nn.Module) -> bool:
        base = innermost(module)
        if cls.base_types is None or isinstance(base, cls.base_types):
            return True
        return nn.Linear in cls.base_types and is_linear(base)

    @classmethod
    def wraps(cls) -> str:
        """The module types this layer can wrap, for error messages."""
        if cls.base_types is None:
            return "any module"
        return ", ".join(t.__name__ for t in cls.base_types)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        # Layers have (in, out) features (core/layer_types.py); a method may also wrap a whole block (adapters).
        adaptable = layer_types.is_adaptable(innermost(base_layer))
        self.in_features, self.out_features = linear_shape(base_layer) if adaptable else (None, None)
        # peft's flag for GPT-2's Conv1D, which stores W as (in, out); methods record it in their config.
        self.fan_in_fan_out = layer_types.is_gpt2_conv1d(innermost(base_layer))
        self.merged_adapters: list[str] = []
        self._kept: dict[str, list] = {}  # with exact_unmerge: the base entries each merge overwrote

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, so code that reads `module.weight` keeps working."""
        return innermost(self).weight

    def adapter_names(self) -> list[str]:
        return list(getattr(self, self.adapter_layer_names[0]).keys())

    def delete_adapter(self, name: str) -> None:
        """Remove every per-adapter state: the adapter dicts, and every other dict this layer keys by adapter
        name (scaling, dropout, kernel choice, factors, flags, shared projections), so a method adds none."""
        holders = [m for m in self.children() if isinstance(m, (nn.ModuleDict, nn.ParameterDict))]
        holders += [v for k, v in vars(self).items() if isinstance(v, dict) and not k.startswith("_")]
        for holder in holders:
            if name in holder:  # optional parts (e.g. DoRA's magnitude) exist for some adapters only
                del holder[name]

    def add_adapter(self, name: str, config) -> None:
        raise NotImplementedError

    def apply_adapter(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        raise NotImplementedError

    def contribution(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        """What adapter `name` changes in `result` (the output so far, from input x): the term a gate or a
        weighted sum scales (the hybrid methods). For an additive method, its update s B A x."""
        return self.apply_adapter(x, result, name) - result

    def delta_weight(self, name: str) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weight")

    def delta_bias(self, name: str) -> torch.Tensor | None:
        """The update of the base bias (out,) for methods that change it (BitFit, chapter 06); None: unchanged.
        Such methods may return None from `delta_weight` when the weight does not change."""
        return None

    def _fold(self, name: str, sign: float) -> None:
        base = innermost(self)
        delta = self.delta_weight(name)
        if delta is not None and hasattr(base, "add_to_weight"):
            base.add_to_weight(sign * delta)  # (out, in); a 4-bit base re-rounds the sum (chapter 09)
        elif delta is not None:
            delta = delta.to(base.weight.dtype)  # (d_out, fan_in)
            base.weight.data += sign * layer_types.to_stored(base, delta)  # as the base stores it
        bias = self.delta_bias(name)
        if bias is not None:
            base.bias.data += sign * bias.to(base.bias.dtype)  # (out,)

    def _entries_to_restore(self, name: str) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(base parameter, flat indices, values there) for every entry a merge of `name` will change."""
        base, weight, bias = innermost(self), self.delta_weight(name), self.delta_bias(name)
        if weight is not None:
            weight = layer_types.to_stored(base, weight)  # e.g. Conv1D's (in, out)
        kept = []
        for param, delta in ((base.weight, weight), (getattr(base, "bias", None), bias)):
            if delta is not None:
                index = delta.reshape(-1).nonzero().squeeze(1)  # (n_changed,)
                kept.append((param, index, param.data.view(-1)[index].clone()))
        return kept

    def merge(self, names: list[str] | None = None) -> None:
        """Fold the named (default: active) adapters into the base weight; one already merged is skipped
        (its update would be added twice; `PeftModel.merge_adapter` warns, as peft does)."""
        for name in names or self.active_adapters:
            if name not in self.adapter_names() or name in self.merged_adapters:
                continue
            if self.exact_unmerge:
                self._kept[name] = self._entries_to_restore(name)
            self._fold(name, +1.0)
            self.merged_adapters.append(name)

    def finite_update(self, name: str) -> bool:
        """Whether merging `name` writes finite numbers only (`merge_adapter(safe_merge=True)` checks first)."""
        weight, bias = self.delta_weight(name), self.delta_bias(name)
        return all(t is None or bool(torch.isfinite(t).all()) for t in (weight, bias))

    def unmerge(self) -> None:
        """Take every merged adapter out of the base weight again: bit-exactly with `exact_unmerge`
        (the overwritten entries are put back), otherwise by subtraction (up to rounding)."""
        while self.merged_adapters:
            name = self.merged_adapters[-1]
            if name in self._kept:
                for param, index, values in self._kept.pop(name):
                    param.data.view(-1)[index] = values
            else:
                # Still listed as merged while folding out: a delta that depends on the base weight
                # (DoRA) needs to know.
                self._fold(name, -1.0)
            self.merged_adapters.pop()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.adapt(x, self.base_layer(x, *args, **kwargs))

    def unmerged_active(self) -> list[str]:
        """The active adapters this layer holds and has not merged: the ones its forward applies."""
        return [n for n in self.active_adapters if n in self.adapter_names() and n not in self.merged_adapters]

    def adapt(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """`result` (what the base computed from x) with the adapters applied: the active unmerged ones, or in
        a mixed batch each row's own. A method whose adapter is not on the base output (a parallel branch)
        calls it with its own `result`."""
        if self.disabled:
            return result
        if self.row_adapters is not None:
            return self.apply_per_row(x, result, self.row_adapters)
        for name in self.unmerged_active():
            result = self.apply_adapter(x, result, name)
        return result

    def apply_per_row(self, x: torch.Tensor, result: torch.Tensor, names: list[str]) -> torch.Tensor:
        """Mixed batch: row i gets adapter names[i] (none for "__base__" or a name this layer lacks).
        Generic: one `apply_adapter` per adapter on its rows; a method may override it with a gathered kernel."""
        out = result.clone()
        for name, rows in rows_of(names, x).items():
            if name in self.adapter_names():
                out[rows] = self.apply_adapter(x[rows], result[rows], name)
        return out


class ModulesToSaveWrapper(AdapterWrapper):
    """Keeps the original module frozen and trains a copy per adapter (peft's layout:
    `original_module` and `modules_to_save.<adapter>`)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()

    def add_adapter(self, name: str, config=None) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]

    def forward(self, *args, **kwargs):
        if self.row_adapters is not None and not self.disabled:  # mixed batch: each row through its own copy
            x, *rest = args
            out = self.original_module(x, *rest, **kwargs)
            for name, rows in rows_of(self.row_adapters, x).items():
                if name in self.modules_to_save:
                    out[rows] = self.modules_to_save[name](x[rows], *rest, **kwargs)
            return out
        active = [n for n in self.active_adapters if n in self.modules_to_save]
        if self.disabled or not active:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[active[0]](*args, **kwargs)
