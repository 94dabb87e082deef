"""The MAM adapter ("Mix-And-Match"; He et al., 2022, "Towards a Unified View of Parameter-Efficient
Transfer Learning", arXiv:2110.04366). Taught in chapter 08.

He et al. write prefix tuning, adapters and LoRA as one form, a modification Delta h added to a hidden
state h, and compare where it goes and how it is composed. Two findings make MAM:

- modifying attention pays off with a small budget: prefix tuning, l key/value vectors per layer, is
  already good at small l;
- the feed-forward sublayer uses a larger budget better, and there a parallel adapter scaled by s
  beats the serial one: FFN(x) + s f(x), f(x) = W_up ReLU(W_down x).

So MAM is prefix tuning with l = 30 in every attention layer plus a scaled parallel adapter with
bottleneck r = 512 and s = 4 beside every FFN: composed from minipeft's own parts, nothing new.

    head_l(x) = softmax(q [P_k^l ; K]^T / sqrt(d_h)) [P_v^l ; V]       (prefix_tuning.py)
    FFN_l(x) + s W_up ReLU(W_down x)                                  (adapters.py, ParallelAdapterLayer)

Cost: the prefix's n d_kv + MLP (n L 2 d_kv after folding) plus L (2 d r + r + d). Neither part
merges into the weights. `HybridConfig` and `HybridMethod`, the plumbing a hybrid method shares (its
flat config builds its parts), live here too; UniPELT (unipelt.py) reuses them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from ..additive.adapters import ParallelAdapterConfig
from ..additive.prefix_tuning import PrefixTuningConfig
from ..core.config import Method, PeftConfig, register


@dataclass
class HybridConfig(PeftConfig):
    """A method made of other methods: flat fields, saved as one config; `parts()` builds the parts' configs."""

    def __post_init__(self) -> None:
        super().__post_init__()
        try:  # a bad value is refused when the config is made, in the hybrid's name
            self.parts()
        except (TypeError, ValueError) as error:
            raise type(error)(f"{type(self).__name__}: {error}") from None

    def parts(self) -> list[PeftConfig]:
        raise NotImplementedError


class HybridMethod(Method):
    """core/inject.py injects each of `config.parts()` under the hybrid's adapter name, all or none."""

    def parts(self, config: HybridConfig) -> list[PeftConfig]:
        return config.parts()


@dataclass
class MAMConfig(HybridConfig):
    """`target_modules` places the parallel adapter (None: beside each block's FFN); the prefix is in every layer.
    The defaults are the paper's, for 12-24 layer models; at tiny scale the chapter passes smaller values."""

    peft_type = "MAM"
    # l, prefix length: 30 in He et al.'s MAM (a small budget at attention, where a prefix does well).
    num_virtual_tokens: int = 30
    # Train the prefix through an MLP, P = MLP(P'), as Li & Liang and He et al. do; False: P is the parameter.
    prefix_projection: bool = True
    # Hidden width of that MLP: 800, the value in He et al.'s released code.
    encoder_hidden_size: int | None = 800
    # r of the FFN parallel adapter: 512 in He et al.'s MAM (the FFN is where a larger budget pays off).
    bottleneck_size: int = 512
    # s in FFN(x) + s f(x): 4, which He et al. found better than 1 for the parallel adapter.
    scaling: float = 4.0
    # The adapter's nonlinearity: ReLU in He et al.
    non_linearity: Literal["relu", "gelu", "tanh"] = "relu"
    # True: W_up = 0, the adapter starts at nothing (the prefix still changes the output). False: tests.
    init_weights: bool = True

    def parts(self) -> list[PeftConfig]:
        prefix = PrefixTuningConfig(
            num_virtual_tokens=self.num_virtual_tokens,
            prefix_projection=self.prefix_projection,
            encoder_hidden_size=self.encoder_hidden_size,
        )
        adapter = ParallelAdapterConfig(
            bottleneck_size=self.bottleneck_size,
            scaling=self.scaling,
            non_linearity=self.non_linearity,
            init_weights=self.init_weights,
            target_modules=self.target_modules,
            modules_to_save=self.modules_to_save,
        )
        return [prefix, adapter]

    def folded(self) -> MAMConfig:
        """The config once `fold_prompt_encoder` replaced the prefix's MLP by the table it computes."""
        return dataclasses.replace(self, prefix_projection=False)


MAM = register(HybridMethod(MAMConfig, None))
