"""UniPELT (Mao et al., 2022, "UniPELT: A Unified Framework for Parameter-Efficient Language Model
Tuning", arXiv:2110.07577). Taught in chapter 08.

Every layer carries three methods at once, and each is behind a learned gate that decides, per
example, how much of it to use:

    LoRA on W_q and W_v:     h = W_0 x + G_L B A x                  G_L = gate(x), x: the projection's input
    prefix tuning:           keys [G_P P_k ; K], values [G_P P_v ; V]     G_P = gate(x), x: the attention's input
    adapter after the FFN:   h <- h + G_A f(h)                       G_A = gate(h), h: the adapter's input
    gate(x) = mean_t sigmoid(w . x_t + b)                           one number per example (w: (d,), b: scalar)

as in the paper's released code: each gate reads the input of the part it scales, its value is the
mean over the tokens, and G_L takes the place of LoRA's alpha / r (so the LoRA part has alpha = r).
The gates start with w ~ N(0, 0.02^2) and b = 0 (BERT's initialisation, which the paper's gates get),
so every gate starts near sigmoid(0) = 1/2: each part enters at about half strength.

The parts are minipeft's own (LoRA, prefix tuning, a Pfeiffer adapter); the gates are one more part,
`UniPELTGates`, whose `GateLayer` wraps each LoRA and adapter layer and scales that layer's term
(`TunerLayer.contribution`). The prefix gate lives in the gate layer of each layer's query projection,
which reads the same hidden states as the attention and runs before it reads its key/value cache:
`GatedPrefixCache` hands each attention layer its prefix scaled by that gate. Gates are computed from
the tokens of the current forward pass; in generate() a step sees its new token only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import DynamicCache

from ..additive.adapters import AdapterConfig, SerialAdapterLayer
from ..additive.prefix_tuning import PrefixTuningConfig
from ..core.architectures import model_type, role_pattern
from ..core.config import Method, PeftConfig, register
from ..core.layers import TunerLayer
from ..core.targets import find_targets
from ..reparameterized.lora import LoraConfig
from .mam import HybridConfig, HybridMethod

# Families whose attention projects its queries from its input and then reads the cache once per layer (tested).
GATED_FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "gemma", "gemma2", "bert", "roberta")


@dataclass
class UniPELTGates(PeftConfig):
    """The gates of a UniPELT adapter: a part of `UniPELTConfig` only (they scale the other parts)."""

    peft_type = "UNIPELT_GATES"


@dataclass
class UniPELTConfig(HybridConfig):
    """The paper's placement, fixed: LoRA on the query and value projections, a prefix in every layer, an
    adapter after every feed-forward sublayer. The defaults are the paper's (BERT-base); at tiny scale the
    chapter passes smaller values."""

    peft_type = "UNIPELT"
    # LoRA rank r: 8, the paper's setting. Its alpha / r is replaced by the gate.
    r: int = 8
    # Prefix length: 10, the paper's setting.
    num_virtual_tokens: int = 10
    # Train the prefix through an MLP, P = MLP(P'), as the paper does; False: P is the parameter.
    prefix_projection: bool = True
    # Hidden width of that MLP: 512 in the paper's code.
    encoder_hidden_size: int | None = 512
    # Adapter bottleneck m = d / reduction_factor: 16, the Pfeiffer adapter the paper uses (48 on BERT-base).
    reduction_factor: int = 16
    # The adapter's nonlinearity: ReLU, the Pfeiffer adapter's.
    non_linearity: Literal["relu", "gelu", "tanh"] = "relu"
    # True: LoRA's B = 0 and the adapter's W_up = 0 (the prefix still changes the output). False: tests.
    init_weights: bool = True

    def parts(self) -> list[PeftConfig]:
        if self.target_modules is not None:
            raise ValueError(
                f"target_modules={self.target_modules!r}: UniPELT places its parts as the paper does (LoRA on the "
                "query and value projections, the adapter after each feed-forward sublayer); leave it None"
            )
        return [
            LoraConfig(r=self.r, lora_alpha=self.r, init_lora_weights=self.init_weights,
                       modules_to_save=self.modules_to_save),  # alpha = r: the gate is LoRA's only scale
            PrefixTuningConfig(num_virtual_tokens=self.num_virtual_tokens, prefix_projection=self.prefix_projection,
                               encoder_hidden_size=self.encoder_hidden_size),
            AdapterConfig(placement="pfeiffer", reduction_factor=self.reduction_factor,
                          non_linearity=self.non_linearity, init_weights=self.init_weights),
            UniPELTGates(),  # last: the gates wrap the layers the other parts made
        ]  # fmt: skip

    def folded(self) -> UniPELTConfig:
        """The config once `fold_prompt_encoder` replaced the prefix's MLP by the table it computes."""
        return dataclasses.replace(self, prefix_projection=False)


class Gate(nn.Linear):
    """gate(x) = mean_t sigmoid(w . x_t + b), one number per example."""

    def __init__(self, width: int, like: torch.Tensor) -> None:
        super().__init__(width, 1, device=like.device, dtype=like.dtype)  # w: (1, d), b: (1,)
        nn.init.normal_(self.weight, std=0.02)  # BERT's initialisation, as the paper's gates
        nn.init.zeros_(self.bias)
        self.last: torch.Tensor | None = None  # (B,) the values of the last forward pass, for gate_values()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(super().forward(x.to(self.weight.dtype))).mean(dim=1)[:, 0]  # (B, T, 1) -> (B,)
        self.last = gate.detach()
        return gate


def per_example(gate: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1), to scale a tensor of like's shape row by row."""
    return gate.to(like.dtype).view(-1, *[1] * (like.dim() - 1))


class GateLayer(TunerLayer):
    """A LoRA or adapter layer of a UniPELT adapter, its term scaled by a gate: result + G * term.
    At a query projection it also computes the prefix gate G_P, which `GatedPrefixCache` takes."""

    adapter_layer_names = ("gate", "prefix_gate")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.gate = nn.ModuleDict()
        self.prefix_gate = nn.ModuleDict()
        self.part: dict[str, str] = {}  # "lora" (the gate reads the layer's input) or "adapter" (its output)
        self.pending: dict[str, torch.Tensor] = {}  # G_P of this forward pass (B,), until the cache takes it

    def add_adapter(self, name: str, config: UniPELTGates) -> None:
        part = self.base_layer
        if not isinstance(part, TunerLayer) or name not in part.adapter_names():
            raise ValueError(
                f"UniPELT's gates scale the LoRA and adapter parts of the adapter {name!r}, but this "
                f"{type(part).__name__} has none; build the gates with UniPELTConfig, which adds the parts first"
            )
        self.part[name] = "adapter" if isinstance(part, SerialAdapterLayer) else "lora"
        self.gate[name] = Gate(part.out_features if self.part[name] == "adapter" else part.in_features, self.weight)

    def add_prefix_gate(self, name: str) -> None:
        self.prefix_gate[name] = Gate(self.in_features, self.weight)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        part = self.base_layer
        names = [] if self.disabled else [n for n in self.active_adapters if n in self.gate]
        for name in names:
            if name in self.prefix_gate:
                self.pending[name] = self.prefix_gate[name](x)  # x: (B, T, d), the attention's input
        if not names or self.row_adapters is not None:  # a mixed batch cannot hold a prefix adapter's rows
            return part(x, *args, **kwargs)
        result = part.base_layer(x, *args, **kwargs)  # (B, T, d_out)
        for name in part.unmerged_active():  # the part's own loop (TunerLayer.adapt), gating this layer's adapters
            if name not in names:
                result = part.apply_adapter(x, result, name)
                continue
            gate = self.gate[name](result if self.part[name] == "adapter" else x)  # (B,)
            result = result + per_example(gate, result) * part.contribution(x, result, name)
        return result

    def delta_weight(self, name: str) -> torch.Tensor:
        raise ValueError("UniPELT's gates depend on the input, so its parts cannot be merged; keep the PeftModel")


class GatedPrefixCache(DynamicCache):
    """The prefix's key/value cache, read through the prefix gates: attention layer l gets its n prefix keys
    and values scaled by the G_P its query projection just computed. The cache keeps them unscaled."""

    def __init__(self, prefix: DynamicCache, sites: list[GateLayer], name: str, n: int) -> None:
        super().__init__(ddp_cache_data=[(layer.keys, layer.values) for layer in prefix.layers])
        self.sites, self.name, self.n = sites, name, n  # sites[l]: layer l's query projection

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)  # (B, heads, n + T, hd)
        gate = self.sites[layer_idx].pending.pop(self.name)  # (B,)
        return self.gated(keys, gate), self.gated(values, gate)

    def gated(self, kv: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        prefix = kv[:, :, : self.n] * per_example(gate, kv)  # (B, heads, n, hd)
        return torch.cat([prefix, kv[:, :, self.n :]], dim=2)  # (B, heads, n + T, hd)


class GatesMethod(Method):
    """Wraps the LoRA and adapter layers; adds the prefix gates at the query projections (`link`)."""

    def resolve(self, model: nn.Module, config: UniPELTGates) -> UniPELTGates:
        if model_type(model) not in GATED_FAMILIES:
            raise ValueError(
                f"UniPELT gates the prefix inside attention, which minipeft does for {list(GATED_FAMILIES)}; "
                f"this model is {model_type(model)!r}"
            )
        return config

    def link(self, model: nn.Module, config: UniPELTGates, adapter_name: str, layers: dict[str, nn.Module]) -> None:
        for name in find_targets(model, None, role_pattern(model, ("q",))):
            layers[name].add_prefix_gate(adapter_name)

    def prepare_inputs(
        self, peft_model: nn.Module, kwargs: dict[str, Any], adapter_name: str, generating: bool = False
    ) -> dict[str, Any]:
        """Runs after the prefix part put its cache into the inputs: read it through the gates."""
        embedding = peft_model.get_input_embeddings()
        if embedding.active() != adapter_name:
            return kwargs
        sites = [m for m in peft_model.modules() if isinstance(m, GateLayer) and adapter_name in m.prefix_gate]
        n = embedding.prompt_config[adapter_name].num_virtual_tokens
        kwargs["past_key_values"] = GatedPrefixCache(kwargs["past_key_values"], sites, adapter_name, n)
        return kwargs


def gate_values(peft_model: nn.Module, adapter_name: str = "default") -> dict[int, dict[str, float]]:
    """{layer: {part: gate}} of a UniPELT adapter, each gate averaged over the examples of the last forward
    pass that ran it; parts "prefix", "adapter" and "lora.<projection>" (e.g. "lora.q_proj")."""
    if not isinstance(peft_model.peft_config.get(adapter_name), UniPELTConfig):
        raise ValueError(f"{adapter_name!r} is not a UniPELT adapter of this model: {dict(peft_model.peft_config)}")
    values: dict[int, dict[str, float]] = {}
    for module_name, layer in peft_model.base_model.model.named_modules():
        if not isinstance(layer, GateLayer) or adapter_name not in layer.gate:
            continue
        index = next(int(p) for p in module_name.split(".") if p.isdigit())
        part = layer.part[adapter_name]
        gates = {part if part == "adapter" else f"lora.{module_name.rpartition('.')[2]}": layer.gate[adapter_name]}
        if adapter_name in layer.prefix_gate:
            gates["prefix"] = layer.prefix_gate[adapter_name]
        for label, gate in gates.items():
            if gate.last is None:
                raise ValueError(f"the gates of {adapter_name!r} have not run yet: call the model on a batch first")
            values.setdefault(index, {})[label] = gate.last.float().mean().item()
    return values


UNIPELT_GATES = register(GatesMethod(UniPELTGates, GateLayer, default_roles=("q", "v", "ffn_out")))
UNIPELT = register(HybridMethod(UniPELTConfig, None))
