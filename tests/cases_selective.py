"""Property-suite entries for the selective family (chapter 06), each with its closed-form count
computed from the base model's own tensors (not from what the method built)."""

from __future__ import annotations

from torch import nn

import minipeft as mp
from tests.cases import Case

# Modules whose biases (BitFit), norms (LN tuning) and weights (masks) the cases train, per architecture.
BIASED = {"gpt2": ["c_attn", "c_fc", "ln_1"], "bert": ["query", "value", "dense", "LayerNorm"]}
NORMS = {"gpt2": ["ln_1", "ln_2", "ln_f"], "llama": ["input_layernorm", "post_attention_layernorm", "norm"]}
NORMS["bert"] = ["LayerNorm"]
MATRICES = {"gpt2": ["c_attn", "c_proj"], "llama": "all-linear", "bert": ["query", "value", "dense"]}
BLOCKS = {"gpt2": "transformer.h", "llama": "model.layers", "bert": "encoder.layer"}
SPARSITY = 0.01


def params_of(base: nn.Module, names: list[str], which: str | None = None) -> int:
    """Total size of the named modules' own parameters (only `which`, e.g. "bias", if given)."""
    modules = [base.get_submodule(n) for n in names]
    return sum(p.numel() for m in modules for k, p in m.named_parameters(recurse=False) if which in (None, k))


def last_blocks(base: nn.Module, k: int) -> int:
    return sum(
        p.numel() for block in base.get_submodule(BLOCKS[base.config.model_type])[-k:] for p in block.parameters()
    )


CASES = {
    "BITFIT": Case(
        config=lambda kind, identity: mp.BitFitConfig(target_modules=BIASED[kind], init_weights=identity),
        closed_form=lambda base, names, cfg: params_of(base, names, "bias"),
        kinds=("bert", "gpt2"),  # LLaMA-style models have no biases: see test_selective_bad_input
    ),
    "LN_TUNING": Case(
        config=lambda kind, identity: mp.LNTuningConfig(target_modules=NORMS[kind], init_weights=identity),
        closed_form=lambda base, names, cfg: params_of(base, names),
    ),
    "PARTIAL": Case(
        # ".*": every module inside the last block (target_modules only narrows the blocks' modules).
        config=lambda kind, identity: mp.PartialConfig(num_last_blocks=1, target_modules=".*", init_weights=identity),
        closed_form=lambda base, names, cfg: last_blocks(base, cfg.num_last_blocks),
    ),
    "DIFF_PRUNING": Case(
        config=lambda kind, identity: mp.DiffPruningConfig(
            sparsity=SPARSITY, target_modules=MATRICES[kind], init_weights=identity
        ),
        closed_form=lambda base, names, cfg: 2 * params_of(base, names, "weight"),  # search phase: w and log_alpha
    ),
    "FISHMASK": Case(
        config=lambda kind, identity: mp.FishMaskConfig(
            sparsity=SPARSITY, target_modules=MATRICES[kind], init_weights=identity
        ),
        closed_form=lambda base, names, cfg: round(cfg.sparsity * params_of(base, names, "weight")),
    ),
}
