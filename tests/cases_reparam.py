"""Property-suite entries for chapter 07's methods: LoRA's variants (DoRA, PiSSA), AdaLoRA, VeRA,
LoHa, LoKr and the intrinsic-dimension subspace. Each closed form is the one the chapter writes."""

from __future__ import annotations

import minipeft as mp
from minipeft.core import linear_shape
from tests.cases import LINEAR_TARGETS, Case, lora_count


def shapes(base, names):
    """(d_in, d_out) of every targeted linear."""
    return [linear_shape(base.get_submodule(n)) for n in names]


def sqrt_pair(dim: int) -> tuple[int, int]:
    """The divisor pair m * n = dim with the smallest sum, m <= n (the Kronecker split LoKr uses)."""
    m = min((m for m in range(1, dim + 1) if dim % m == 0 and m * m <= dim), key=lambda m: m + dim // m)
    return m, dim // m


def lokr_count(base, names, cfg) -> int:
    """W1 (a x c) in full; W2 (b x d) as r (b + d) when r < max(b, d) / 2, else b d."""
    total = 0
    for d_in, d_out in shapes(base, names):
        (a, b), (c, d) = sqrt_pair(d_out), sqrt_pair(d_in)
        total += a * c + (cfg.r * (b + d) if cfg.r < max(b, d) / 2 else b * d)
    return total


CASES: dict[str, Case] = {
    "LORA/dora": Case(
        config=lambda kind, identity: mp.LoraConfig(
            r=4, lora_alpha=8, target_modules=LINEAR_TARGETS[kind], use_dora=True, init_lora_weights=identity
        ),
        # LoRA's factors plus one magnitude per output row.
        closed_form=lambda base, names, cfg: lora_count(base, names, cfg.r) + sum(o for _, o in shapes(base, names)),
    ),
    "LORA/pissa": Case(
        # PiSSA is always output-preserving at init; "identity=False" cannot be asked of it.
        config=lambda kind, identity: mp.LoraConfig(
            r=4, lora_alpha=8, target_modules=LINEAR_TARGETS[kind], init_lora_weights="pissa"
        ),
        closed_form=lambda base, names, cfg: lora_count(base, names, cfg.r),
        keeps_base=False,
    ),
    "ADALORA": Case(
        config=lambda kind, identity: mp.AdaLoraConfig(
            init_r=4, target_r=2, total_step=10, target_modules=LINEAR_TARGETS[kind], init_lora_weights=identity
        ),
        # P (d_out x r), Q (r x d_in) and r singular values.
        closed_form=lambda base, names, cfg: sum(cfg.init_r * (i + o + 1) for i, o in shapes(base, names)),
    ),
    "VERA": Case(
        config=lambda kind, identity: mp.VeraConfig(r=8, target_modules=LINEAR_TARGETS[kind], init_weights=identity),
        # lambda_b (d_out) and lambda_d (r) per layer; the shared A and B are frozen.
        closed_form=lambda base, names, cfg: sum(o + cfg.r for _, o in shapes(base, names)),
    ),
    "LOHA": Case(
        config=lambda kind, identity: mp.LoHaConfig(
            r=4, alpha=8, target_modules=LINEAR_TARGETS[kind], init_weights=identity
        ),
        # Two LoRA-sized pairs.
        closed_form=lambda base, names, cfg: 2 * lora_count(base, names, cfg.r),
    ),
    "LOKR": Case(
        config=lambda kind, identity: mp.LoKrConfig(
            r=4, alpha=8, target_modules=LINEAR_TARGETS[kind], init_weights=identity
        ),
        closed_form=lokr_count,
    ),
    "INTRINSIC": Case(
        config=lambda kind, identity: mp.IntrinsicConfig(
            intrinsic_dim=48, target_modules=LINEAR_TARGETS[kind], init_weights=identity
        ),
        # d numbers, whatever the model's size.
        closed_form=lambda base, names, cfg: cfg.intrinsic_dim,
    ),
}
