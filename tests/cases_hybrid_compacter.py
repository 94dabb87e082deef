"""Compacter and Compacter++ (chapter 08) in the shared property suite, with the closed-form count written from
the architectures' configs (tests/cases_additive.py's `dims`), not from minipeft's modules.

A PHM layer d_in -> d_out with n terms of rank r holds, per term, s_i (d_out/n, r) and t_i (d_in/n, r): together
r (d_in + d_out), plus a bias of d_out. An adapter site of width d and bottleneck m is a down (d -> m) and an up
(m -> d) PHM layer:

    2 r (d + m) + d + m    per site,    plus n^3 once (the shared A_i), or n^3 per PHM layer when not shared.

Compacter has two sites per block (after attention and FFN), Compacter++ one (after the FFN). The paper's count,
4 L (d + m) + n^3 for r = 1, leaves out the biases.
"""

from __future__ import annotations

from minipeft.hybrid.compacter import CompacterConfig
from tests.cases import Case
from tests.cases_additive import BOTTLENECK, dims

# A non-trivial adapter for the suite (identity=False): A ~ N(0, 0.5^2) instead of the paper's 1e-4, which
# leaves f(h) near 1e-8 h, too small to tell from the base model.
VISIBLE = 0.5


def compacter_count(base, cfg: CompacterConfig) -> int:
    L, d = dims(base)["L"], dims(base)["d"]
    m, n, r = cfg.bottleneck_size, cfg.phm_dim, cfg.phm_rank
    sites = 2 * L if cfg.placement == "houlsby" else L
    rules = n**3 if cfg.shared_phm_rule else 2 * sites * n**3
    return sites * (2 * r * (d + m) + d + m) + rules


def case(**fields) -> Case:
    return Case(
        config=lambda kind, identity: CompacterConfig(
            bottleneck_size=BOTTLENECK, init_weights=identity, phm_init_range=1e-4 if identity else VISIBLE, **fields
        ),
        closed_form=lambda base, names, cfg: compacter_count(base, cfg),
        mergeable=False,
    )


CASES = {
    "COMPACTER": case(),
    "COMPACTER/plusplus": case(placement="pfeiffer"),
    "COMPACTER/unshared_rank2": case(shared_phm_rule=False, phm_rank=2),
}
