"""MAM and UniPELT in the shared property suite (chapter 08), with closed-form counts written from the
architectures' configs (tests/cases_additive.py's `dims`), not from minipeft's modules:

- MAM: the prefix (n d_kv plus its MLP) and one parallel adapter per block, 2 d m + m + d;
- UniPELT: LoRA r (d_in + d_out) on the query and value projections (GPT-2: the fused c_attn, d -> 3d),
  the prefix, a Pfeiffer adapter with m = d // 16 per block, and a gate (d + 1) per LoRA layer, per
  adapter and per layer's prefix.

Neither starts at the base model (the prefix adds keys from the start) and neither merges.
"""

from __future__ import annotations

from minipeft.hybrid.mam import MAMConfig
from minipeft.hybrid.unipelt import UniPELTConfig, UniPELTGates
from tests.cases import Case
from tests.cases_additive import BOTTLENECK, HIDDEN, N_VIRTUAL, bottleneck_count, dims, prefix_count

RANK = 4  # UniPELT's LoRA rank on the tiny models


def unipelt_count(base, cfg: UniPELTConfig) -> int:
    g = dims(base)
    L, d, r = g["L"], g["d"], cfg.r
    # (d_in, d_out) of the LoRA layers in one block: GPT-2's fused c_attn, else the query and value projections.
    lora = [(d, 3 * d)] if base.config.model_type == "gpt2" else [(d, d), (d, g["d_kv"])]
    per_block = sum(r * (i + o) + (i + 1) for i, o in lora)  # LoRA factors + one gate each
    per_block += bottleneck_count(d, d // cfg.reduction_factor) + (d + 1)  # the adapter and its gate
    per_block += d + 1  # the prefix gate
    return L * per_block + prefix_count(base, cfg)


CASES = {
    "MAM": Case(
        config=lambda kind, identity: MAMConfig(
            num_virtual_tokens=N_VIRTUAL, encoder_hidden_size=HIDDEN, bottleneck_size=BOTTLENECK, init_weights=identity
        ),
        closed_form=lambda base, names, cfg: prefix_count(base, cfg)
        + dims(base)["L"] * bottleneck_count(dims(base)["d"], BOTTLENECK),
        mergeable=False,
        identity_at_init=False,
    ),
    "UNIPELT": Case(
        config=lambda kind, identity: UniPELTConfig(
            r=RANK, num_virtual_tokens=N_VIRTUAL, encoder_hidden_size=HIDDEN, init_weights=identity
        ),
        closed_form=lambda base, names, cfg: unipelt_count(base, cfg),
        mergeable=False,
        identity_at_init=False,
    ),
    # A part of UniPELT only: alone it has nothing to gate and is refused (test_hybrid_mam_unipelt.py::
    # test_gates_alone_are_refused); its parameters are counted in UNIPELT's closed form.
    "UNIPELT_GATES": Case(
        config=lambda kind, identity: UniPELTGates(),
        closed_form=lambda base, names, cfg: 0,
        mergeable=False,
        identity_at_init=False,
        kinds=(),
    ),
}
