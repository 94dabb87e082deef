"""Intrinsic dimension: fine-tuning in a random d-dimensional subspace (Li et al., 2018,
arXiv:1804.08838; Aghajanyan et al., 2021, arXiv:2012.13255). Taught in chapter 07.

All targeted weights, flattened into one vector of D numbers, move only along d random directions:

    theta_D = theta_0 + P theta_d,   P: (D, d) random, fixed;   only theta_d (d numbers) trains.

The smallest d that reaches 90% of full fine-tuning's quality is the task's intrinsic dimension
(d_90). A dense P would take D x d floats (3 GB for the testbed at d = 1000), so P is the
Fastfood transform (Le et al., 2013), as in both papers: per block of n = 2^ceil(log2 d) rows,

    P_block = H G Pi H B / (sqrt(n) ||g||),   H: n x n Walsh-Hadamard,  B: random signs,
                                               Pi: a random permutation,  G = diag(g), g ~ N(0, 1)

which costs O(D) memory (16 bytes per weight, four times fp32 weights) and, with H applied as two
small matmuls, O(D sqrt(n)) time instead of O(D d), and has unit-norm rows. (Fastfood's extra
diagonal S, which only gives rows Gaussian-like norms, is left out.) The random parts come from a
seeded generator, one block range per layer, so they are regenerated, never saved: the adapter file
holds theta_d only.

theta_d is one vector shared by every adapted layer; the first layer owns the parameter (its
peft-style key is `<first layer>.intrinsic_theta`), the others read it. Each layer computes its
own rows of P theta_d, so its update merges like LoRA's. Not in HF peft.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import Method, PeftConfig, register
from ..core.layers import TunerLayer, linear_shape
from ..core.targets import LINEAR_TYPES


@dataclass
class IntrinsicConfig(PeftConfig):
    peft_type = "INTRINSIC"
    # d: the dimension of the trained subspace (the only trainable parameters).
    intrinsic_dim: int = 1000
    # Seed of the random projection; with it P is regenerated, never saved.
    projection_prng_key: int = 0
    # D, the number of projected weights; recorded at injection, checked when loading.
    projected_size: int | None = None
    # True: theta_d = 0 (identity at init). False: theta_d ~ N(0, 0.1^2) (tests).
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.intrinsic_dim < 1:
            raise ValueError(f"IntrinsicConfig.intrinsic_dim must be a positive integer, got {self.intrinsic_dim}")


def sylvester(n: int) -> torch.Tensor:
    """The n x n Walsh-Hadamard matrix (n a power of 2), built by H_2k = [[H_k, H_k], [H_k, -H_k]]."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h  # (n, n), entries +-1, symmetric


def hadamard(x: torch.Tensor, h_rows: torch.Tensor, h_cols: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform along the last axis, n = a * b: since H_n = H_a (x) H_b
    (Kronecker), H_n x is H_a X H_b for x laid out as an (a, b) matrix X: two small matmuls,
    O(n (a + b)) instead of O(n^2), and much faster on CPU than the log2(n) butterfly passes."""
    a, b = h_rows.shape[0], h_cols.shape[0]
    grid = x.reshape(*x.shape[:-1], a, b)  # (..., a, b)
    return (h_rows @ grid @ h_cols).reshape(x.shape)  # (..., n)


class Fastfood(nn.Module):
    """`size` rows of a Fastfood projection from d dimensions; the random parts are buffers that
    are regenerated from `seed` and never saved."""

    def __init__(self, d: int, size: int, seed: int) -> None:
        super().__init__()
        self.d, self.size, self.n = d, size, 1 << (d - 1).bit_length()  # n: power of 2 >= d
        blocks = math.ceil(size / self.n)
        gen = torch.Generator().manual_seed(seed)
        sign = torch.randint(0, 2, (blocks, self.n), generator=gen).float() * 2 - 1  # B
        perm = torch.argsort(torch.rand(blocks, self.n, generator=gen), dim=1)  # Pi
        gauss = torch.randn(blocks, self.n, generator=gen)  # G
        gauss /= math.sqrt(self.n) * gauss.norm(dim=1, keepdim=True)  # unit-norm rows
        a = 1 << (self.n.bit_length() - 1) // 2  # n = a * b with a <= b, both powers of 2
        h_rows, h_cols = sylvester(a), sylvester(self.n // a)  # (a, a), (b, b)
        buffers = (("sign", sign), ("perm", perm), ("gauss", gauss), ("h_rows", h_rows), ("h_cols", h_cols))
        for key, value in buffers:
            self.register_buffer(key, value, persistent=False)

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        x = F.pad(theta, (0, self.n - self.d)) * self.sign  # (blocks, n): B theta
        x = torch.gather(hadamard(x, self.h_rows, self.h_cols), 1, self.perm)  # (blocks, n): Pi H B theta
        return hadamard(x * self.gauss, self.h_rows, self.h_cols).reshape(-1)[: self.size]  # (size,): H G Pi H B theta


class IntrinsicLayer(TunerLayer):
    """One base linear whose weight moves along its rows of P theta_d."""

    adapter_layer_names = ("intrinsic_theta",)  # only the owner layer holds theta_d here
    base_types = LINEAR_TYPES

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.intrinsic_theta = nn.ParameterDict()
        self.fastfood = nn.ModuleDict()  # this layer's rows of P; buffers only, never saved
        self.theta: dict[str, nn.Parameter] = {}  # theta_d, owned here or by another layer

    def adapter_names(self) -> list[str]:
        return list(self.fastfood.keys())

    def add_adapter(self, name: str, config: IntrinsicConfig) -> None:
        """Only a placeholder: theta_d is shared by every layer and each layer's seed depends on its place among
        them, so `IntrinsicMethod.link` builds the adapter (`attach`) once all layers are wrapped."""
        self.fastfood[name] = nn.Module()  # a placeholder: the adapter spans layers, `link` builds it

    def attach(self, name: str, config: IntrinsicConfig, theta: nn.Parameter, seed: int, owner: bool) -> None:
        """Read the shared theta_d (and hold it, if this is the first layer) through this layer's rows of P."""
        size = self.in_features * self.out_features
        self.fastfood[name] = Fastfood(config.intrinsic_dim, size, seed).to(self.weight.device)
        self.theta[name] = theta
        if owner:
            self.intrinsic_theta[name] = theta

    def delta_weight(self, name: str) -> torch.Tensor:
        flat = self.fastfood[name](self.theta[name])  # (d_out * d_in,)
        return flat.view(self.out_features, self.in_features)  # (d_out, d_in)

    def apply_adapter(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        delta = self.delta_weight(name)  # (d_out, d_in)
        return result + F.linear(x.to(delta.dtype), delta).to(result.dtype)


class IntrinsicMethod(Method):
    """One shared theta_d for every targeted layer, each with its own blocks of P."""

    def resolve(self, model: nn.Module, config: IntrinsicConfig) -> IntrinsicConfig:
        """Record D, the number of projected weights; an adapter trained on a base of another shape is refused."""
        size = 0
        for name in self.targets(model, config):
            d_in, d_out = linear_shape(model.get_submodule(name))
            size += d_in * d_out
        if config.projected_size not in (None, size):
            raise ValueError(
                f"IntrinsicConfig.projected_size={config.projected_size}, but the targeted weights of this model "
                f"hold {size}: the adapter was trained on a base of another shape, where its subspace means nothing"
            )
        return dataclasses.replace(config, projected_size=size)

    def link(self, model: nn.Module, config: IntrinsicConfig, adapter_name: str, layers: dict[str, nn.Module]) -> None:
        first = next(iter(layers.values()))
        theta = torch.zeros(config.intrinsic_dim, device=first.weight.device, dtype=first.weight.dtype)  # (d,)
        theta = nn.Parameter(theta if config.init_weights else theta.normal_(std=0.1))
        for i, layer in enumerate(layers.values()):
            seed = config.projection_prng_key * 1_000_003 + i
            layer.attach(adapter_name, config, theta, seed=seed, owner=i == 0)


# Li et al. and Aghajanyan et al. project every weight matrix of the network.
INTRINSIC = register(IntrinsicMethod(IntrinsicConfig, IntrinsicLayer, default_roles=("linear",)))
