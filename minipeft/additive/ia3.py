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
from transformers.pytorch_utils import Conv1D

from ..core import layer_types
from ..core.architectures import role_pattern
from ..core.config import Method, PeftConfig, register
from ..core.layers import TunerLayer, innermost
from ..core.targets import find_targets


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
    """A linear layer or convolution whose output (keys, values) or input (FFN) is rescaled by a learned vector."""

    adapter_layer_names = ("ia3_l",)
    base_types = (nn.Linear, Conv1D, nn.Conv2d, nn.Conv3d)  # peft's
    # Unmerge puts the overwritten entries back instead of dividing by l: exact, and a zero in l (a feature
    # switched off) cannot turn the base weights into NaN. It costs a copy of the changed entries while merged.
    exact_unmerge = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward: dict[str, bool] = {}

    def add_adapter(self, name: str, config: IA3Config) -> None:
        """A vector over the outputs (out, 1); `IA3Method.link` turns feed-forward layers' into (1, in)."""
        self.ia3_l[name] = self._vector(self.out_features, False, config)
        self.is_feedforward[name] = False

    def rescale_input(self, name: str, config: IA3Config) -> None:
        """Make this adapter rescale the layer's input instead: a feed-forward layer (peft's layout (1, in))."""
        base = innermost(self)
        if getattr(base, "groups", 1) > 1:
            raise ValueError(f"(IA)^3 rescales the input of a grouped {type(base).__name__} (groups={base.groups}): "
                             "minipeft supports groups=1 only; rescale its output instead")  # fmt: skip
        self.ia3_l[name] = self._vector(self.in_features, True, config)
        self.is_feedforward[name] = True

    def _vector(self, d: int, feedforward: bool, config: IA3Config) -> nn.Parameter:
        """peft's layouts: (1, d_in) or (d_out, 1) for linears, (1, d, 1, ...) for convolutions."""
        base = innermost(self)
        shape = layer_types.feature_param_shape(base, d) or ((1, d) if feedforward else (d, 1))
        vector = torch.ones(shape, device=base.weight.device, dtype=base.weight.dtype)
        if not config.init_ia3_weights:
            vector += 0.5 * torch.randn_like(vector)
        return nn.Parameter(vector)

    def _factor(self, x: torch.Tensor, feedforward: bool) -> torch.Tensor | float:
        """What multiplies the input (feedforward) or the output on its feature axis: the product of the
        active vectors, or in a mixed batch one vector per row (ones for rows whose adapter is not here)."""
        if self.disabled:
            return 1.0
        base = innermost(self)
        kind = [n for n in self.ia3_l if self.is_feedforward[n] == feedforward and n not in self.merged_adapters]
        if self.row_adapters is not None:
            d = self.in_features if feedforward else self.out_features
            ones = torch.ones(d, device=x.device, dtype=x.dtype)
            rows = [self.ia3_l[n].flatten().to(x.dtype) if n in kind else ones for n in self.row_adapters]
            return layer_types.per_feature(base, torch.stack(rows), x.dim())  # (B, d) on the feature axis
        factor = 1.0
        for name in (n for n in self.active_adapters if n in kind):
            factor = factor * self.ia3_l[name].flatten().to(x.dtype)  # (d,)
        return factor if isinstance(factor, float) else layer_types.per_feature(base, factor, x.dim())

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x * self._factor(x, True), *args, **kwargs)  # (..., d_in) scaled on the way in
        return result * self._factor(result, False)  # (..., d_out) scaled on the way out

    def delta_weight(self, name: str) -> torch.Tensor:
        """diag(l) W - W (outputs) or W diag(l) - W (feed-forward inputs), W as a matrix (d_out, fan_in)."""
        weight = layer_types.weight_matrix(innermost(self))  # (d_out, fan_in)
        vector = self.ia3_l[name].flatten().to(weight.dtype)
        if self.is_feedforward[name]:  # one factor per input channel, for all its kernel columns
            scale, weight = vector.view(1, -1, 1), weight.reshape(weight.shape[0], vector.shape[0], -1)
        else:
            scale = vector.view(-1, 1, 1)  # (d_out, 1, 1)
            weight = weight.reshape(weight.shape[0], 1, -1)
        return ((scale - 1) * weight).reshape(weight.shape[0], -1)

    def delta_bias(self, name: str) -> torch.Tensor | None:
        """l * b - b for outputs; the bias comes after a feed-forward layer's input scaling: unchanged."""
        bias = innermost(self).bias
        if self.is_feedforward[name] or bias is None:
            return None
        vector = self.ia3_l[name].flatten().to(bias.dtype)  # (out,)
        return (vector - 1) * bias


class IA3Method(Method):
    """Attention targets rescale their output; feed-forward targets (a subset) rescale their input."""

    def feedforward(self, model: nn.Module, config: IA3Config) -> set[str]:
        ff = config.feedforward_modules
        if ff is None and config.target_modules is None:
            ff = role_pattern(model, ("ffn_out",))
        return set(find_targets(model, ff)) if ff else set()

    def resolve(self, model: nn.Module, config: IA3Config) -> IA3Config:
        outside = self.feedforward(model, config) - set(self.targets(model, config))
        if outside:
            raise ValueError(
                f"feedforward_modules must be a subset of target_modules; these are not targets: {sorted(outside)}"
            )
        return config

    def link(self, model: nn.Module, config: IA3Config, adapter_name: str, layers: dict[str, nn.Module]) -> None:
        for name in self.feedforward(model, config):
            layers[name].rescale_input(adapter_name, config)


# Liu et al. rescale keys, values and the FFN's intermediate activation (the input of its last projection).
IA3 = register(IA3Method(IA3Config, IA3Layer, default_roles=("k", "v", "ffn_out")))
