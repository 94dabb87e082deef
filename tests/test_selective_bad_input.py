"""Bad input to the selective family gets a clear error naming what was wrong and what would be right."""

from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

import minipeft as mp
from minipeft.models import tiny_bert, tiny_gpt2, tiny_llama


@pytest.mark.parametrize("config", [mp.FishMaskConfig, mp.DiffPruningConfig])
@pytest.mark.parametrize("sparsity", [0.0, -0.1, 1.5])
def test_sparsity_outside_zero_one(config, sparsity):
    with pytest.raises(ValueError, match=r"sparsity .*must be in \(0, 1\].*got"):
        config(sparsity=sparsity)


def test_sparsity_of_the_wrong_type():
    with pytest.raises(TypeError, match="FishMaskConfig.sparsity must be"):
        mp.FishMaskConfig(sparsity="1%")


@pytest.mark.parametrize("config", [mp.FishMaskConfig, mp.DiffPruningConfig])
def test_budget_of_zero_entries(config):
    with pytest.raises(ValueError, match="keeps no entry; use sparsity >="):
        mp.get_peft_model(tiny_gpt2(), config(sparsity=1e-9, target_modules=["c_attn"]))


def test_bitfit_on_a_bias_free_model():
    with pytest.raises(ValueError, match="LlamaForCausalLM has no bias parameters.*LNTuningConfig"):
        mp.get_peft_model(tiny_llama(), mp.BitFitConfig())


def test_bitfit_target_without_a_bias():
    with pytest.raises(ValueError, match=r"BitFit trains biases, but \['lm_head'\] have none.*c_attn"):
        mp.get_peft_model(tiny_gpt2(), mp.BitFitConfig(target_modules=["lm_head"]))


def test_ln_tuning_target_that_is_not_a_norm():
    with pytest.raises(ValueError, match=r"LN tuning trains normalisation layers.*query.*LayerNorm"):
        mp.get_peft_model(tiny_bert(), mp.LNTuningConfig(target_modules=["query"]))


def test_mask_on_a_module_without_a_weight_matrix():
    base = tiny_gpt2()
    with pytest.raises(TypeError, match=r"SparseDeltaLayer adapts Linear, Conv1D.*'transformer.h.0.ln_1': 'LayerNorm'"):
        mp.get_peft_model(base, mp.FishMaskConfig(target_modules=["h.0.ln_1", "c_attn"]))
    assert isinstance(base.transformer.h[0].attn.c_attn, Conv1D), "a refused call leaves the model as it was"


def test_more_blocks_than_the_model_has():
    with pytest.raises(ValueError, match=r"num_last_blocks=3 but GPT2LMHeadModel has 2 blocks in 'transformer.h'"):
        mp.get_peft_model(tiny_gpt2(), mp.PartialConfig(num_last_blocks=3))


@pytest.mark.parametrize("k,match", [(-1, "must be >= 0"), (0, "trains nothing; give modules_to_save")])
def test_partial_with_nothing_to_train(k, match):
    with pytest.raises(ValueError, match=match):
        mp.PartialConfig(num_last_blocks=k)


def test_unknown_block_list():
    with pytest.raises(ValueError, match=r"no list of blocks named 'layers'.*transformer.h"):
        mp.get_peft_model(tiny_gpt2(), mp.PartialConfig(blocks="layers"))


def test_fisher_selection_needs_a_fishmask_adapter_and_data():
    ids = torch.randint(3, 200, (2, 8))
    model = mp.get_peft_model(tiny_gpt2(), mp.BitFitConfig())
    with pytest.raises(ValueError, match="not a FishMask adapter: BitFitConfig"):
        mp.select_by_fisher(model, [{"input_ids": ids, "labels": ids}])
    model = mp.get_peft_model(tiny_gpt2(), mp.FishMaskConfig(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="needs at least one batch"):
        mp.select_by_fisher(model, [])


def test_projecting_twice():
    model = mp.get_peft_model(tiny_gpt2(), mp.DiffPruningConfig(target_modules=["c_attn"]))
    mp.project_to_budget(model)
    with pytest.raises(ValueError, match="not in its search phase"):
        mp.project_to_budget(model)


def test_sparse_adapter_into_another_architecture(tmp_path):
    mp.get_peft_model(tiny_gpt2(), mp.FishMaskConfig(target_modules=["c_attn"])).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="matches no module"):
        mp.PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_fisher_selection_without_data_or_scores():
    model = mp.get_peft_model(tiny_gpt2(), mp.FishMaskConfig(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="needs batches of task data, or the scores"):
        mp.select_by_fisher(model)


def test_diff_pruning_negative_l0_weight_is_refused():
    with pytest.raises(ValueError, match=r"DiffPruningConfig.l0_lambda must be >= 0 .*got -1.0"):
        mp.DiffPruningConfig(l0_lambda=-1.0)
