"""Selective counts against independent references: closed forms written from the architecture
(as chapter 06 derives them), the base model's own tensors, and HF peft where it has an equivalent
(LN tuning: `LNTuningConfig`; all biases: LoRA with bias="all" minus bias="none")."""

from __future__ import annotations

import peft
import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

import minipeft as mp
from minipeft.selective.deltas import delta_layers
from tests.cases import MODELS, outputs

IDS = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(2))
PEFT_LORA_TARGET = {
    "gpt2": dict(target_modules=["c_attn"], fan_in_fan_out=True),
    "bert": dict(target_modules=["query"]),
}


def peft_bias_count(kind: str) -> int:
    """What peft makes trainable with bias="all", beyond its LoRA matrices."""
    counts = {}
    for bias in ("all", "none"):
        model = peft.get_peft_model(MODELS[kind](), peft.LoraConfig(r=1, bias=bias, **PEFT_LORA_TARGET[kind]))
        counts[bias] = model.get_nb_trainable_parameters()[0]
    return counts["all"] - counts["none"]


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_bitfit_all_biases_closed_form_and_peft(kind):
    base = MODELS[kind]()
    model = mp.get_peft_model(MODELS[kind](), mp.BitFitConfig())
    L, d = base.config.num_hidden_layers, base.config.hidden_size
    m = getattr(base.config, "intermediate_size", None) or 4 * d  # FFN width (GPT-2: n_inner = 4d)
    # Per block: q, k, v (3d), attention output (d), FFN in (m) and out (d), two norms (2d) = 7d + m.
    # GPT-2 adds the final norm (d); BERT the embedding norm and the pooler (2d).
    closed_form = L * (7 * d + m) + (d if kind == "gpt2" else 2 * d)
    assert closed_form == sum(p.numel() for n, p in base.named_parameters() if n.endswith(".bias"))
    assert model.get_nb_trainable_parameters() == (closed_form, sum(p.numel() for p in base.parameters()) + closed_form)
    assert closed_form == peft_bias_count(kind)


def test_bitfit_query_and_intermediate_subset():
    """The paper's cheaper variant: query and middle-of-MLP biases only, L * (d + m)."""
    model = mp.get_peft_model(MODELS["bert"](), mp.BitFitConfig(target_modules=["query", "intermediate.dense"]))
    L, d, m = 2, 64, 128  # tiny_bert: 2 blocks, width 64, FFN width 128
    assert model.get_nb_trainable_parameters()[0] == L * (d + m)


@pytest.mark.parametrize("kind,targets", [("gpt2", None), ("llama", None), ("bert", ["LayerNorm"]), ("gpt2", ["ln_f"])])
def test_ln_tuning_counts_and_outputs_match_peft(kind, targets):
    ours = mp.get_peft_model(MODELS[kind](), mp.LNTuningConfig(target_modules=targets))
    theirs = peft.get_peft_model(MODELS[kind](), peft.LNTuningConfig(target_modules=targets))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    # Same function once trained: peft's trained copy of a norm holds base + our delta.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, layer in delta_layers(ours.base_model.model, "default").items():
            theirs_layer = theirs.base_model.model.get_submodule(name)
            for pname, entry in layer.selective_delta["default"].items():
                entry.delta.copy_(torch.randn(entry.delta.shape, generator=gen) * 0.1)
                base = getattr(theirs_layer.base_layer, pname)
                getattr(theirs_layer.ln_tuning_layers["default"], pname).copy_(base + entry.delta)
    torch.testing.assert_close(outputs(ours, IDS), outputs(theirs, IDS), rtol=0, atol=1e-6)


def tiny_classifier() -> GPT2ForSequenceClassification:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=256, n_positions=64, num_labels=5, pad_token_id=0)
    return GPT2ForSequenceClassification(config).eval()


@pytest.mark.parametrize("k", [0, 1, 3])
def test_partial_counts_last_blocks_plus_head(k):
    model = mp.get_peft_model(tiny_classifier(), mp.PartialConfig(num_last_blocks=k, modules_to_save=["score"]))
    d = 32
    # A GPT-2 block: c_attn d*3d + 3d, c_proj d*d + d, c_fc d*4d + 4d, c_proj 4d*d + d, two norms 4d.
    block = 12 * d * d + 13 * d
    assert model.get_nb_trainable_parameters()[0] == k * block + d * 5


@pytest.mark.parametrize("method", [mp.FishMaskConfig, mp.DiffPruningConfig])
@pytest.mark.parametrize("sparsity", [0.0005, 0.01, 0.3, 1.0])
def test_selected_count_equals_budget_exactly(method, sparsity):
    model = mp.get_peft_model(MODELS["gpt2"](), method(sparsity=sparsity, target_modules=["c_attn", "c_fc"]))
    n = 2 * (64 * 192 + 64 * 256)  # the targeted weight entries
    budget = round(sparsity * n)
    if method is mp.FishMaskConfig:
        assert model.get_nb_trainable_parameters()[0] == budget  # the random mask before selection
        mp.select_by_fisher(model, [{"input_ids": IDS, "labels": IDS}])
    else:
        assert model.get_nb_trainable_parameters()[0] == 2 * n  # the search phase: w and log_alpha
        mp.project_to_budget(model)
    assert model.get_nb_trainable_parameters()[0] == budget
    assert sum(model.peft_config["default"].selected_counts.values()) == budget
    for layer in delta_layers(model.base_model.model, "default").values():
        indices = layer.selective_delta["default"]["weight"].indices
        assert len(indices.unique()) == len(indices), "a position was selected twice"
