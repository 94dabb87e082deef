"""AdapterFusion (Pfeiffer, Kamath, Rückle, Cho and Gurevych, 2021, "AdapterFusion: Non-Destructive Task
Composition for Transfer Learning", arXiv:2005.00247). Taught in chapter 08.

Two stages. First, N serial bottleneck adapters (chapter 03, `AdapterConfig`) are trained, one per
task. Then, with the base and all N adapters frozen, a fusion layer at every adapter site learns to
mix them for a target task. Where the sublayer outputs h (one token: a vector of width d), adapter n
contributes z_n = f_n(h) (its bottleneck output, without its residual), and the paper's Sec. 3.2 gives

    s_n = softmax_n( (h Q) . (z_n K) / T )     attention of the token over the N adapters
    o   = sum_n s_n (z_n V)                     the output becomes h + o

with Q, K, V: (d, d) per site, 3 d^2 parameters: the only ones that train. As in the authors' library
(AdapterHub), the residual h is added once, after the mix. The paper has no temperature (T = 1,
the default; a larger T flattens s towards the mean).

Init (paper, Sec. 4.1): Q and K random (N(0, 0.02), BERT's init, which AdapterHub uses), V the identity
with off-diagonal noise of size 1e-6. So at init o = sum_n s_n f_n(h) up to ~1e-6: a convex mix of the
adapters' own outputs (their mean where s is uniform); fusing N copies of one adapter starts as that
adapter. The paper keeps V near the identity with an l2 penalty during training: add
`value_regularization(model, name)` (lambda ||I - V||_F^2 summed over sites, AdapterHub's form) to the loss.

    model.add_adapter("fusion", FusionConfig(adapter_names=["a", "b"]))
    model.set_adapter("fusion")        # a and b run, frozen; only Q, K, V (and modules_to_save) train

AdapterHub's other composition block, `Stack("a", "b")` (adapter b reads adapter a's output at every
site), needs no code here: it is `model.set_adapter(["a", "b"])` (core/layers.py `adapt`). A fusion
always applies after the serial adapters active in its layer, so `set_adapter(["lang", "fusion"])` is
AdapterHub's `Stack("lang", Fuse("a", "b"))`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..additive.adapters import SerialAdapterLayer
from ..core.config import Method, PeftConfig, register
from ..core.layers import TunerLayer


@dataclass
class FusionConfig(PeftConfig):
    peft_type = "ADAPTER_FUSION"
    # Names of the trained serial adapters to fuse (AdapterConfig), all at the same sites; two or more.
    adapter_names: list[str] = field(default_factory=list)
    # Softmax temperature T; the paper uses none (T = 1). Larger T: attention closer to uniform.
    temperature: float = 1.0
    # lambda in value_regularization's lambda ||I - V||^2 per site; AdapterHub's 0.01.
    regularization_weight: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.adapter_names) < 2 or len(set(self.adapter_names)) != len(self.adapter_names):
            raise ValueError(
                f"FusionConfig.adapter_names must name two or more distinct trained serial adapters, e.g. "
                f"['a', 'b'], got {self.adapter_names!r}"
            )
        if self.temperature <= 0 or self.regularization_weight < 0:
            raise ValueError(
                f"FusionConfig needs temperature > 0 and regularization_weight >= 0, got temperature="
                f"{self.temperature}, regularization_weight={self.regularization_weight}"
            )
        if self.target_modules is not None:
            raise ValueError(
                f"FusionConfig.target_modules must be None (got {self.target_modules!r}): the fusion goes where "
                "its adapters are; choose the sites when you add the adapters"
            )


class Fusion(nn.Module):
    """The attention over N adapter outputs at one site: Q, K, V, each (d, d) without bias, as in the paper."""

    def __init__(self, d: int, like: torch.Tensor) -> None:
        super().__init__()
        self.query, self.key, self.value = (
            nn.Linear(d, d, bias=False, device=like.device, dtype=like.dtype) for _ in range(3)
        )
        with torch.no_grad():
            nn.init.normal_(self.query.weight, std=0.02)
            nn.init.normal_(self.key.weight, std=0.02)
            self.value.weight.normal_(std=1e-6).fill_diagonal_(1.0)

    def attention(self, h: torch.Tensor, z: torch.Tensor, temperature: float) -> torch.Tensor:
        """s: each token's weights over the N adapters, from h (B, T, d) and z (B, T, N, d)."""
        q = self.query(h).unsqueeze(-2)  # (B, T, 1, d)
        return torch.softmax((q * self.key(z)).sum(-1) / temperature, dim=-1)  # (B, T, N)

    def forward(self, h: torch.Tensor, z: torch.Tensor, temperature: float) -> torch.Tensor:
        h, z = h.to(self.query.weight.dtype), z.to(self.query.weight.dtype)
        s = self.attention(h, z, temperature)  # (B, T, N)
        return (s.unsqueeze(-1) * self.value(z)).sum(-2)  # (B, T, N, d) -> (B, T, d)


def serial_layer(module: nn.Module) -> SerialAdapterLayer:
    """The serial adapter layer at or under `module`, through any wrappers around it."""
    while not isinstance(module, SerialAdapterLayer):
        module = module.base_layer
    return module


class FusionLayer(TunerLayer):
    """Wraps an adapter site (the layer holding the serial adapters, with any wrappers): h + o."""

    adapter_layer_names = ("adapter_fusion",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.adapter_fusion = nn.ModuleDict()
        self.fused: dict[str, list[str]] = {}  # fusion name -> the adapters it mixes, in order
        self.temperature: dict[str, float] = {}

    def add_adapter(self, name: str, config: FusionConfig) -> None:
        self.adapter_fusion[name] = Fusion(self.out_features, self.weight)
        self.fused[name] = list(config.adapter_names)
        self.temperature[name] = config.temperature

    def apply_adapter(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        serial = serial_layer(self.base_layer)
        z = torch.stack([serial.contribution(x, result, n) for n in self.fused[name]], dim=-2)  # (B, T, N, d)
        return result + self.adapter_fusion[name](result, z, self.temperature[name]).to(result.dtype)


def wrapper_chains(model: nn.Module) -> dict[str, list[TunerLayer]]:
    """Each wrapped module's name -> its TunerLayers, outermost first (a module wrapped twice has two)."""
    chains: dict[str, list[TunerLayer]] = {}
    inner: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, TunerLayer) and id(module) not in inner:
            chain = [module]
            while isinstance(chain[-1].base_layer, TunerLayer):
                chain.append(chain[-1].base_layer)
            inner.update(id(m) for m in chain)
            chains[name] = chain
    return chains


def fusion_sites(model: nn.Module, names: list[str]) -> list[str]:
    """The modules holding the serial adapters `names`; refuse, naming what is wrong, adapters that do not
    exist, that are not serial adapters, or that do not all sit at the same modules."""
    held: dict[str, set[str]] = {n: set() for n in names}  # adapter -> types of the layers holding it
    sites: dict[str, list[str]] = {n: [] for n in names}  # adapter -> the modules where it is a serial adapter
    serial_names: set[str] = set()
    for site, chain in wrapper_chains(model).items():
        for layer in chain:
            is_serial = isinstance(layer, SerialAdapterLayer)
            serial_names.update(layer.adapter_names() if is_serial else [])
            for n in set(names) & set(layer.adapter_names()):
                held[n].add(type(layer).__name__)
                sites[n] += [site] if is_serial else []
    missing = [n for n in names if not held[n]]
    if missing:
        raise ValueError(
            f"FusionConfig.adapter_names: this model has no adapter named {missing}; its serial adapters are "
            f"{sorted(serial_names)}. Add or load the adapters to fuse first"
        )
    other = {n: sorted(kinds - {"SerialAdapterLayer"}) for n, kinds in held.items() if kinds != {"SerialAdapterLayer"}}
    if other:
        raise TypeError(
            f"AdapterFusion fuses serial bottleneck adapters (AdapterConfig) only; these are held by other layers: "
            f"{other}. Fuse among the serial adapters {sorted(serial_names)}"
        )
    uneven = {n: sorted(set(sites[n]) ^ set(sites[names[0]])) for n in names[1:] if sites[n] != sites[names[0]]}
    if uneven:
        raise ValueError(
            f"the adapters to fuse must sit at the same modules (same placement and target_modules); compared with "
            f"{names[0]!r}, these differ at: {uneven}"
        )
    return sites[names[0]]


class FusionMethod(Method):
    """Targets: the sites of the fused adapters. They are checked before anything changes."""

    def targets(self, model: nn.Module, config: FusionConfig) -> list[str]:
        return fusion_sites(model, config.adapter_names)

    def depends_on(self, config: FusionConfig) -> list[str]:
        return list(config.adapter_names)


def value_regularization(model: nn.Module, adapter_name: str) -> torch.Tensor:
    """The paper's penalty keeping each V near the identity: lambda * sum over sites of ||I - V||_F^2.
    Add it to the training loss, e.g. `train_classifier(..., extra_loss=lambda: value_regularization(m, name))`."""
    config = model.peft_config.get(adapter_name)
    if not isinstance(config, FusionConfig):
        fusions = sorted(n for n, c in model.peft_config.items() if isinstance(c, FusionConfig))
        raise ValueError(f"value_regularization: {adapter_name!r} is not an AdapterFusion adapter; those are {fusions}")
    total = 0.0
    for layer in model.modules():
        if isinstance(layer, FusionLayer) and adapter_name in layer.adapter_fusion:
            v = layer.adapter_fusion[adapter_name].value.weight  # (d, d)
            total = total + (torch.eye(v.shape[0], device=v.device, dtype=v.dtype) - v).pow(2).sum()
    return config.regularization_weight * total


FUSION = register(FusionMethod(FusionConfig, FusionLayer))
