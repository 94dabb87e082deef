"""Merging trained LoRA adapters into one new LoRA adapter: `PeftModel.add_weighted_adapter`, with the
combination types and results of HF peft.

Adapter i has factors A_i (r_i, fan_in), B_i (d_out, r_i), scaling s_i and weight w_i; its update is
s_i B_i A_i. The new adapter has scaling 1 (lora_alpha = r), so every s_i is folded into its factors.

    cat        B = [B_1 ... B_n],  A = [w_1 s_1 A_1; ...; w_n s_n A_n]: rank sum_i r_i and
               B A = sum_i w_i s_i B_i A_i exactly
    linear     task arithmetic (Ilharco et al., 2023, "Editing Models with Task Arithmetic", arXiv:2212.04089)
               on each factor: A = sum_i sign(c_i) sqrt|c_i| A_i, B = sum_i sqrt|c_i| B_i with c_i = w_i s_i.
               One adapter gives c_1 B_1 A_1 exactly; several give cross terms B_i A_j as well (all ranks equal)
    ties       TIES-Merging (Yadav et al., 2023, arXiv:2306.01708) on each factor: keep each tensor's
               `density` largest entries, elect a sign per entry, average the weighted entries of that sign
    dare_linear   DARE (Yu et al., 2023, "Language Models are Super Mario", arXiv:2311.03099): drop each
               entry with probability 1 - density, rescale the kept ones by 1 / density, then task arithmetic
    dare_ties  DARE's drop, then TIES' sign election and disjoint mean
    magnitude_prune   TIES' trim, then task arithmetic
    svd, <rule>_svd   the rule (svd: task arithmetic) on the full updates s_i B_i A_i, laid out as the base stores
               its weight, then a truncated SVD U S V^T of the result: B = U S, A = V^T, rank `svd_rank`
               (default: the largest r_i). Exact up to the discarded singular values

The random drop of DARE draws from torch's global generator (as peft does): `torch.manual_seed` before
the call fixes its masks. Each layer combines the adapters it has; the new adapter's config is the first
adapter's, with the new rank, lora_alpha = rank and the targets of all of them.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core import layer_types
from ..core.layers import innermost
from ..core.model import WEIGHTED_COMBINERS, PeftModel
from ..reparameterized.lora import LORA, LoraConfig, LoraLayer

# -- the rules: a list of same-shape tensors and one weight each -> one tensor --------------------------


def trim(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) entries of largest magnitude, zero the rest (TIES' trim step)."""
    keep = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    keep[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel())).indices] = 1
    return tensor * keep.reshape(tensor.shape)


def drop(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep each entry with probability `density` and divide the kept ones by it (DARE), so the expected
    value is the tensor itself. density = 1 draws nothing."""
    if density >= 1:
        return tensor
    return tensor * torch.bernoulli(torch.full_like(tensor, density)) / density


def _weighted(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """(n, *shape): tensor i times weight i."""
    stacked = torch.stack(list(tensors))
    return stacked * weights.reshape(-1, *[1] * (stacked.dim() - 1))


def weighted_sum(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Task arithmetic: sum_i w_i t_i."""
    return _weighted(tensors, weights).sum(0)


def disjoint_mean(tensors: Sequence[torch.Tensor], weights: torch.Tensor, sign_method: str = "total") -> torch.Tensor:
    """TIES' elect and disjoint merge: per entry, the sign of the (unweighted) sum ("total") or the more
    frequent sign ("frequency") wins, ties going to +; the weighted entries of that sign are averaged
    (zeros, trimmed or dropped, do not count)."""
    stacked = torch.stack(list(tensors))
    votes = stacked if sign_method == "total" else stacked.sign()
    agree = stacked.sign() == torch.where(votes.sum(0) >= 0, 1, -1)
    return (_weighted(tensors, weights) * agree).sum(0) / torch.clamp(agree.sum(0), min=1.0)


def linear(tensors, weights, density=None, sign_method="total"):
    return weighted_sum(tensors, weights)


def ties(tensors, weights, density, sign_method="total"):
    return disjoint_mean([trim(t, density) for t in tensors], weights, sign_method)


def dare_linear(tensors, weights, density, sign_method="total"):
    return weighted_sum([drop(t, density) for t in tensors], weights)


def dare_ties(tensors, weights, density, sign_method="total"):
    return disjoint_mean([drop(t, density) for t in tensors], weights, sign_method)


def magnitude_prune(tensors, weights, density, sign_method="total"):
    return weighted_sum([trim(t, density) for t in tensors], weights)


Rule = Callable[[Sequence[torch.Tensor], torch.Tensor, float | None, str], torch.Tensor]
RULES: dict[str, Rule] = {
    "linear": linear,
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
    "magnitude_prune": magnitude_prune,
}
SVD_TYPES = {"svd": "linear", **{f"{rule}_svd": rule for rule in RULES if rule != "linear"}}  # type -> rule
COMBINATION_TYPES = ("cat", *RULES, *SVD_TYPES)
DENSITY_RULES = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


# -- one layer -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Merge:
    """What one call asks for, checked: the rule to use, the new rank and the options."""

    combination_type: str
    rank: int
    density: float | None = None
    sign_method: str = "total"
    svd_clamp: float | None = None
    svd_full_matrices: bool = True
    svd_driver: str | None = None


def present(layer: LoraLayer, adapters: Sequence[str], weights: Sequence[float]) -> list[tuple[str, float]]:
    """The (adapter, weight) pairs of the adapters this layer has."""
    return [(a, w) for a, w in zip(adapters, weights, strict=True) if a in layer.adapter_names()]


def factor_merge(layer: LoraLayer, pairs, weights_a, weights_b, rule: Rule, merge: Merge):
    """A rule applied to the A factors with `weights_a` and to the B factors with `weights_b`."""
    a, b = zip(*(layer.factors(name) for name, _ in pairs), strict=True)
    device = a[0].device
    new_a = rule([t.detach() for t in a], torch.tensor(weights_a, device=device), merge.density, merge.sign_method)
    new_b = rule([t.detach() for t in b], torch.tensor(weights_b, device=device), merge.density, merge.sign_method)
    return new_a.to(a[0].dtype), new_b.to(a[0].dtype)


def _as_matrix(base: nn.Module, stored: torch.Tensor) -> torch.Tensor:
    """The inverse of `layer_types.to_stored`: a weight as the base stores it -> (d_out, fan_in)."""
    return stored.T if isinstance(base, (Conv1D, nn.Embedding)) else stored.reshape(stored.shape[0], -1)


def svd_factors(delta: torch.Tensor, merge: Merge) -> tuple[torch.Tensor, torch.Tensor]:
    """A (rank, fan_in), B (d_out, rank) with B A the best rank-`merge.rank` approximation of delta."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=merge.svd_full_matrices, driver=merge.svd_driver)
    b, a = u[:, : merge.rank] @ torch.diag(s[: merge.rank]), vh[: merge.rank]
    if merge.svd_clamp is not None:  # clip outliers of both factors at a quantile of their entries
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), merge.svd_clamp)
        a, b = a.clamp(-high, high), b.clamp(-high, high)
    return a, b


def merge_layer(layer: LoraLayer, adapters, weights, merge: Merge) -> tuple[torch.Tensor, torch.Tensor]:
    """The new adapter's A (rank, fan_in) and B (d_out, rank) on one layer; nothing is changed."""
    pairs, kind = present(layer, adapters, weights), merge.combination_type
    if kind == "cat":  # the adapters' ranks side by side; zeros for the ranks of adapters this layer lacks
        parts = [(fa.detach() * w * layer.scaling[n], fb.detach()) for n, w in pairs for fa, fb in [layer.factors(n)]]
        a, b = torch.cat([p for p, _ in parts]), torch.cat([p for _, p in parts], dim=1)
        return F.pad(a, (0, 0, 0, merge.rank - a.shape[0])), F.pad(b, (0, merge.rank - b.shape[1]))
    if kind in SVD_TYPES:
        base = innermost(layer)
        deltas = [layer_types.to_stored(base, layer.delta_weight(n).detach()) for n, _ in pairs]
        weights = torch.tensor([w for _, w in pairs], device=deltas[0].device)
        combined = RULES[SVD_TYPES[kind]](deltas, weights, merge.density, merge.sign_method)
        return svd_factors(_as_matrix(base, combined).float(), merge)
    scaled = [w * layer.scaling[n] for n, w in pairs]  # sqrt|c| on both factors, the sign on A's side
    weights_a = [(1 if c >= 0 else -1) * math.sqrt(abs(c)) for c in scaled]
    return factor_merge(layer, pairs, weights_a, [math.sqrt(abs(c)) for c in scaled], RULES[kind], merge)


# -- the model -----------------------------------------------------------------------------------------


def lora_layers(peft_model: PeftModel, adapters: Sequence[str]) -> dict[str, LoraLayer]:
    """{target name: layer} of the LoRA layers that hold any of `adapters`, in module order. The target
    name is the module's name in the base model (a LoRA layer inside another method's wrapper sits at
    `<name>.base_layer`)."""
    layers: dict[str, LoraLayer] = {}
    for name, m in peft_model.base_model.model.named_modules():
        if isinstance(m, LoraLayer) and any(a in m.adapter_names() for a in adapters):
            target = re.sub(r"(\.base_layer)+$", "", name)
            if target in layers:
                raise ValueError(f"{target} holds these adapters in two LoRA layers (one wrapped around another "
                                 "method's wrapper); merge the adapters of each layer separately")  # fmt: skip
            layers[target] = m
    return layers


def holder(peft_model: PeftModel, name: str, adapter_name: str) -> LoraLayer:
    """The LoRA layer holding `adapter_name` at target `name`: the module there or one it wraps."""
    module = peft_model.base_model.model.get_submodule(name)
    while not (isinstance(module, LoraLayer) and adapter_name in module.adapter_names()):
        module = module.base_layer
    return module


def check_sources(peft_model: PeftModel, adapters, weights, adapter_name: str) -> list[LoraConfig]:
    """The source adapters' configs, after checking names, types and weights."""
    if not isinstance(adapters, (list, tuple)) or not adapters or not all(isinstance(a, str) for a in adapters):
        raise ValueError(f"adapters must be a non-empty list of adapter names, got {adapters!r}")
    unknown = [a for a in adapters if a not in peft_model.peft_config]
    if unknown:
        raise ValueError(f"no adapter named {unknown[0]!r}; this model has {sorted(peft_model.peft_config)}")
    if len(set(adapters)) != len(adapters):
        raise ValueError(f"adapters must be distinct, got {adapters!r}")
    if not isinstance(weights, (list, tuple)) or len(weights) != len(adapters):
        raise ValueError(f"weights must be a list with one weight per adapter ({len(adapters)}), got {weights!r}")
    bad = [w for w in weights if not isinstance(w, numbers.Real) or isinstance(w, bool) or not math.isfinite(w)]
    if bad:
        raise ValueError(f"weights must be finite real numbers, got {weights!r}")
    if adapter_name in peft_model.peft_config:  # before the work; add_adapter checks the name's form
        raise ValueError(f"an adapter named {adapter_name!r} exists already: {sorted(peft_model.peft_config)}")
    configs = [peft_model.peft_config[a] for a in adapters]
    for name, config in zip(adapters, configs, strict=True):
        if not isinstance(config, LoraConfig):
            raise ValueError(f"adapter {name!r} is {config.peft_type}; add_weighted_adapter merges LoRA adapters only")
        if config.use_dora:
            raise ValueError(f"adapter {name!r} is DoRA: its update is not s B A alone (a magnitude rescales it), "
                             "so it has no weighted combination of factors; merge plain LoRA adapters")  # fmt: skip
        if config.modules_to_save:
            raise ValueError(
                f"adapter {name!r} also trains whole modules (modules_to_save={config.modules_to_save}); "
                "only low-rank updates have a weighted combination"
            )
    return configs


def check_merge(layers: dict[str, LoraLayer], configs, combination_type, svd_rank, density, sign_method,
                svd_clamp) -> int:  # fmt: skip
    """The new rank, after checking the combination type and its options against the layers."""
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type must be one of {list(COMBINATION_TYPES)}, got {combination_type!r}")
    rule = SVD_TYPES.get(combination_type, combination_type)
    if rule in DENSITY_RULES:
        if not isinstance(density, numbers.Real) or isinstance(density, bool) or not 0 < density <= 1:
            raise ValueError(f"combination_type={combination_type!r} needs density in (0, 1] (the fraction of "
                             f"entries kept), got {density!r}")  # fmt: skip
    elif density is not None:
        raise ValueError(f"density applies to {list(DENSITY_RULES)} and their _svd forms, not {combination_type!r}")
    if sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {sign_method!r}")
    svd = combination_type in SVD_TYPES
    if not svd and (svd_rank is not None or svd_clamp is not None):
        raise ValueError(f"svd_rank and svd_clamp apply to the svd combination types, not {combination_type!r}")
    if svd_clamp is not None and not (isinstance(svd_clamp, numbers.Real) and 0 < svd_clamp <= 1):
        raise ValueError(f"svd_clamp is a quantile in (0, 1], got {svd_clamp!r}")
    ranks = [c.r for c in configs]
    if combination_type == "cat":
        rank = sum(ranks)
    elif svd:
        if svd_rank is not None and (not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank < 1):
            raise ValueError(f"svd_rank must be a positive integer, got {svd_rank!r}")
        rank = svd_rank or max(ranks)
    elif len(set(ranks)) > 1:
        raise ValueError(f"combination_type={combination_type!r} combines A and B entry by entry, so all adapters "
                         f"need the same r, got {ranks}; use 'cat' or an svd type for different ranks")  # fmt: skip
    else:
        rank = ranks[0]
    for name, layer in layers.items():
        d_out, fan_in = layer_types.matrix_shape(innermost(layer))
        if rank > min(d_out, fan_in):
            what = "svd_rank" if svd and svd_rank else f"the {combination_type} rank"
            raise ValueError(f"{what} {rank} exceeds min(d_out, fan_in) = {min(d_out, fan_in)} of {name}; "
                             f"use a rank <= {min(d_out, fan_in)}")  # fmt: skip
    return rank


def merged_targets(peft_model: PeftModel, configs, names: list[str], rank: int) -> LoraConfig:
    """The new adapter's config: the first adapter's, with the new rank, scaling 1 and all their targets
    (the same targets; else the union of the lists; else the exact module names)."""
    targets = [c.target_modules for c in configs]
    if all(t == targets[0] for t in targets):
        union = targets[0]
    elif all(isinstance(t, list) for t in targets):
        union = list(dict.fromkeys(n for t in targets for n in t))
    else:
        union = names
    config = dataclasses.replace(configs[0], r=rank, lora_alpha=rank, use_rslora=False, init_lora_weights=True,
                                 target_modules=union)  # fmt: skip
    if sorted(LORA.targets(peft_model.base_model.model, config)) != sorted(names):
        config = dataclasses.replace(config, target_modules=names)
    return config


def add_weighted_adapter(
    peft_model: PeftModel,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> None:
    """Add `adapter_name`, a LoRA adapter combining the LoRA `adapters` with `weights` (negative weights
    subtract) by `combination_type` (this module's docstring); peft's signature and results. Everything is
    checked and computed before the model changes; the active adapters stay as they are.

    As in peft, a single adapter is always combined `linear` (the options of the type asked for still have
    to be valid). Unlike peft, an existing `adapter_name` is an error (peft returns silently), and the new
    adapter never uses rsLoRA or PiSSA init (its factors already carry the scaling; PiSSA would rewrite
    the base weight again)."""
    configs = check_sources(peft_model, adapters, weights, adapter_name)
    layers = lora_layers(peft_model, adapters)
    rank = check_merge(layers, configs, combination_type, svd_rank, density, majority_sign_method, svd_clamp)
    if len(adapters) == 1:  # peft's rule; the rank is then the adapter's own
        combination_type, rank = "linear", configs[0].r
    merge = Merge(combination_type, rank, density, majority_sign_method, svd_clamp, svd_full_matrices, svd_driver)
    with torch.no_grad():
        factors = {name: merge_layer(layer, adapters, weights, merge) for name, layer in layers.items()}
    config = merged_targets(peft_model, configs, list(layers), rank)
    write_adapter(peft_model, adapter_name, config, factors)


def write_adapter(peft_model: PeftModel, adapter_name: str, config: LoraConfig, factors: dict) -> None:
    """Add `adapter_name` (if new) and set its factors: {module name: (A, B)} in `LoraLayer.factors` layout."""
    if adapter_name not in peft_model.peft_config:
        peft_model.add_adapter(adapter_name, config)
    with torch.no_grad():
        for name, (a, b) in factors.items():
            target_a, target_b = holder(peft_model, name, adapter_name).factors(adapter_name)
            target_a.copy_(a)
            target_b.copy_(b)


WEIGHTED_COMBINERS[LORA.config_cls.peft_type] = add_weighted_adapter
