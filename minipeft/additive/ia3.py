"""(IA)^3: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al., 2022,
"Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning",
arXiv:2205.05638). Taught in chapter 05.

Three learned vectors rescale activations elementwise in every block:

    k <- l_k * k,   v <- l_v * v   (attention keys and values: the output of their projection)
    h <- l_ff * act(W_1 x)          (the FFN's intermediate activation: the input of W_2)

All vectors start at 1, so the adapted model starts exactly at the base model. The cost is
d_k + d_v + d_ff numbers per block, one per feature: fewer than LoRA or adapters at their usual
sizes. A rescaling
of a linear layer's output or input is a rescaling of its weight, so (IA)^3 merges:
W <- diag(l) W (and b <- l * b) for outputs, W <- W diag(l) for inputs. GPT-2 fuses q, k
and v into one `c_attn`; as in HF peft, its vector rescales all three (3d numbers).
Parameter names (`ia3_l`) and shapes are HF peft's, so adapter files are interchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import Method, PeftConfig, register
from ..core.inject import replace_module
from ..core.layers import TunerLayer, innermost
from ..core.targets import find_targets, is_linear

# The feed-forward modules (their *input* is rescaled) among each architecture's default targets.
DEFAULT_FEEDFORWARD = {"gpt2": ["mlp.c_proj"], "llama": ["down_proj"], "bert": r".*layer\.\d+\.output\.dense"}


@dataclass
class IA3Config(PeftConfig):
    peft_type = "IA3"
    # Which of target_modules are feed-forward (input rescaled, l_ff); the others get their output
    # rescaled (l_k, l_v). None: the architecture's default, like target_modules.
    feedforward_modules: list[str] | str | None = None
    # True: every vector starts at 1 (identity). False: random around 1 (tests need a non-trivial update).
    init_ia3_weights: bool = True
    # Written for peft: GPT-2's Conv1D stores weights as (in, out). minipeft detects it per layer.
    fan_in_fan_out: bool = False


class IA3Layer(TunerLayer):
    """A linear layer whose output (keys, values) or input (FFN) is rescaled by a learned vector."""

    adapter_layer_names = ("ia3_l",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward: dict[str, bool] = {}

    def add_adapter(self, name: str, config: IA3Config, feedforward: bool = False) -> None:
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)  # peft's layout
        weight = self.weight
        vector = torch.ones(shape, device=weight.device, dtype=weight.dtype)
        if not config.init_ia3_weights:
            vector += 0.5 * torch.randn_like(vector)
        self.ia3_l[name] = nn.Parameter(vector)
        self.is_feedforward[name] = feedforward
        config.fan_in_fan_out |= self.fan_in_fan_out

    def _factor(self, x: torch.Tensor, feedforward: bool) -> torch.Tensor | float:
        """What multiplies the input (feedforward) or the output: the product of the active vectors,
        or in a mixed batch one vector per row (ones for rows whose adapter is not here)."""
        if self.disabled:
            return 1.0
        kind = [n for n in self.ia3_l if self.is_feedforward[n] == feedforward and n not in self.merged_adapters]
        if self.row_adapters is not None:  # (B, 1, ..., d)
            rows = [self.ia3_l[n].flatten() if n in kind else None for n in self.row_adapters]
            d = self.in_features if feedforward else self.out_features
            ones = torch.ones(d, device=x.device, dtype=x.dtype)
            return torch.stack([ones if r is None else r.to(x.dtype) for r in rows]).view(
                len(rows), *[1] * (x.dim() - 2), d
            )
        factor = 1.0
        for name in (n for n in self.active_adapters if n in kind):
            factor = factor * self.ia3_l[name].flatten().to(x.dtype)  # (d,)
        return factor

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x * self._factor(x, True), *args, **kwargs)  # (..., d_in) scaled on the way in
        return result * self._factor(result, False)  # (..., d_out) scaled on the way out

    def _original(self, name: str, tensor: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The base tensor before `name` was merged (during unmerge it is still scaled by it)."""
        return tensor / scale if name in self.merged_adapters else tensor

    def delta_weight(self, name: str) -> torch.Tensor:
        """diag(l) W - W (outputs) or W diag(l) - W (feed-forward inputs), in (out, in) layout."""
        weight = self.weight.T if self.fan_in_fan_out else self.weight  # (out, in)
        vector = self.ia3_l[name].to(weight.dtype)  # (out, 1) or (1, in): broadcasts over W
        return (vector - 1) * self._original(name, weight, vector)

    def delta_bias(self, name: str) -> torch.Tensor | None:
        """l * b - b for outputs; the bias comes after a feed-forward layer's input scaling: unchanged."""
        bias = innermost(self).bias
        if self.is_feedforward[name] or bias is None:
            return None
        vector = self.ia3_l[name].flatten().to(bias.dtype)  # (out,)
        return (vector - 1) * self._original(name, bias, vector)


class IA3Method(Method):
    """Wraps each target and tells it whether it is feed-forward (input) or attention (output)."""

    def inject(self, model: nn.Module, config: IA3Config, adapter_name: str) -> None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        names = find_targets(model, config.target_modules, self.default_targets.get(model_type))
        modules = {n: innermost(model.get_submodule(n)) for n in names}
        not_linear = {n: type(m).__name__ for n, m in modules.items() if not is_linear(m)}
        if not_linear:
            linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if is_linear(m)})
            raise ValueError(
                f"(IA)^3 rescales the input or output of linear layers, but these targets are not linear: "
                f"{not_linear}. Target linear layers instead, e.g. {linear}"
            )
        ff_targets = config.feedforward_modules
        if ff_targets is None and config.target_modules is None:
            ff_targets = DEFAULT_FEEDFORWARD.get(model_type)
        feedforward = set(find_targets(model, ff_targets)) if ff_targets else set()
        if not feedforward <= set(names):
            raise ValueError(
                f"feedforward_modules must be a subset of target_modules; these are not targets: "
                f"{sorted(feedforward - set(names))}"
            )
        for name in names:
            module = model.get_submodule(name)
            if not isinstance(module, IA3Layer):
                module = IA3Layer(module)
                replace_module(model, name, module)
            if adapter_name in module.adapter_names():
                raise ValueError(f"module {name!r} already has an adapter named {adapter_name!r}")
            module.add_adapter(adapter_name, config, feedforward=name in feedforward)


IA3 = register(
    IA3Method(
        IA3Config,
        IA3Layer,
        default_targets={
            "gpt2": ["c_attn", "mlp.c_proj"],
            "llama": ["k_proj", "v_proj", "down_proj"],
            "bert": r".*\.(key|value)|.*layer\.\d+\.output\.dense",
        },
    )
)
