"""What the selective family shares (chapter 06): train a part of the *existing* parameters,
held as a delta next to the frozen base, so that naming, saving, disabling and merging are
the shared mechanism of `core/`.

A `DeltaLayer` wraps one module (a linear, a norm, ...) and holds, per adapter, one entry per
chosen parameter of that module:

- `DenseDelta`: a delta of the parameter's full shape (BitFit's biases, LN tuning's gains and
  shifts, partial fine-tuning);
- `SparseDelta`: k flat positions (an int32 buffer) and k trained values (FishMask, and diff
  pruning after its projection). Only the k values get gradients and optimizer state, and the
  adapter file holds positions + values, so it grows with k, not with the model.

The module runs once, with each chosen parameter replaced by base + delta (`functional_call`).
Merging adds the deltas to the base; unmerging puts the overwritten entries back bit-exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from ..core.layers import TunerLayer, innermost
from ..core.targets import _inside_wrappers, find_targets

# Scale of the random deltas that init_weights=False draws (tests need a non-trivial update).
RANDOM_INIT_STD = 0.1


def initial_values(shape: tuple[int, ...], like: torch.Tensor, zero: bool) -> nn.Parameter:
    """Zeros (the adapted model starts at the base model) or small random values."""
    values = torch.zeros(shape, dtype=like.dtype, device=like.device)
    return nn.Parameter(values if zero else values.normal_(0.0, RANDOM_INIT_STD))


class DenseDelta(nn.Module):
    """A full-size delta of one parameter."""

    def __init__(self, param: torch.Tensor, zero: bool = True) -> None:
        super().__init__()
        self.delta = initial_values(tuple(param.shape), param, zero)

    def forward(self) -> torch.Tensor:
        return self.delta


class SparseDelta(nn.Module):
    """k entries of one parameter: flat positions in its own layout, and their values."""

    def __init__(self, param: torch.Tensor, indices: torch.Tensor, zero: bool = True) -> None:
        super().__init__()
        self.shape = tuple(param.shape)
        self.register_buffer("indices", indices.to(device=param.device, dtype=torch.int32))  # (k,)
        self.values = initial_values((len(indices),), param, zero)  # (k,)

    def forward(self) -> torch.Tensor:
        dense = self.values.new_zeros(math.prod(self.shape))  # (numel,)
        return dense.index_put((self.indices.long(),), self.values).view(self.shape)


class DeltaLayer(TunerLayer):
    """One module whose chosen parameters get a delta per adapter (dense or sparse). By default every
    parameter the module holds itself gets a dense delta (LN tuning, partial fine-tuning); a method that
    chooses otherwise overrides `new_entries`."""

    adapter_layer_names = ("selective_delta",)
    exact_unmerge = True  # deltas are sparse or small: keep the overwritten entries instead of subtracting

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.selective_delta = nn.ModuleDict()  # {adapter: ModuleDict{parameter name: entry}}

    def new_entries(self, config) -> dict[str, nn.Module]:
        """{parameter name: entry} of a new adapter: a dense delta of each of the module's own parameters."""
        own = innermost(self).named_parameters(recurse=False)
        return {p: DenseDelta(t, config.init_weights) for p, t in own}

    def add_adapter(self, name: str, config) -> None:
        entries = self.new_entries(config)
        unknown = set(entries) - {"weight", "bias"}
        if unknown:
            raise ValueError(f"a DeltaLayer changes `weight` and `bias` only (what merging folds), got {unknown}")
        self.selective_delta[name] = nn.ModuleDict(entries).train(self.training)

    def delta(self, name: str, param_name: str) -> torch.Tensor | None:
        """The dense delta of one base parameter, in that parameter's own layout, as evaluation computes it
        (deterministic, so that what a merge adds is what an unmerge or a projection sees)."""
        entries = self.selective_delta[name]
        if param_name not in entries:
            return None
        entry, mode = entries[param_name], entries[param_name].training
        delta = entry.eval()()
        entry.train(mode)
        return delta

    def delta_weight(self, name: str) -> torch.Tensor | None:
        delta = self.delta(name, "weight")
        return delta.T if delta is not None and self.fan_in_fan_out else delta  # nn.Linear layout (out, in)

    def delta_bias(self, name: str) -> torch.Tensor | None:
        return self.delta(name, "bias")

    def run_with_deltas(self, x: torch.Tensor, names: list[str], *args, **kwargs) -> torch.Tensor:
        """The base module's output with each chosen parameter replaced by base + deltas."""
        prefix, module = "", self.base_layer
        while isinstance(module, TunerLayer):  # another method's wrapper in between (composition)
            prefix, module = prefix + "base_layer.", module.base_layer
        base, params = innermost(self), {}
        for name in names:
            for param_name, entry in self.selective_delta[name].items():
                key = prefix + param_name
                params[key] = params.get(key, getattr(base, param_name)) + entry()
        dtypes = {prefix + n: p.dtype for n, p in base.named_parameters(recurse=False)}
        params = {k: v.to(dtypes[k]) for k, v in params.items()}  # an fp32 delta on a half-precision base
        return functional_call(self.base_layer, params, (x, *args), kwargs)

    def apply_adapter(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        return self.run_with_deltas(x, [name])  # the module again, with this adapter's parameters

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled or self.row_adapters is not None:
            return super().forward(x, *args, **kwargs)  # base output, or one adapter per row
        names = self.unmerged_active()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        return self.run_with_deltas(x, names, *args, **kwargs)  # one pass, not base + a second pass


def delta_layers(model: nn.Module, adapter_name: str) -> dict[str, DeltaLayer]:
    """The DeltaLayers that hold this adapter, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, DeltaLayer) and adapter_name in m.adapter_names()}


def outer_modules(model: nn.Module, exclude: list[str] | None = None) -> dict[str, nn.Module]:
    """Modules a selective method may target: not inside another wrapper, not in `exclude`
    (a config's modules_to_save, which train as whole copies)."""
    inner, roots = _inside_wrappers(model), find_targets(model, exclude) if exclude else []
    return {
        n: m
        for n, m in model.named_modules()
        if n and n not in inner and not any(n == r or n.startswith(r + ".") for r in roots)
    }
