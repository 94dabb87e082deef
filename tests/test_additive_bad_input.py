"""Bad input to the additive methods gets a clear error naming what was wrong and what would
be right (ARCHITECTURE.md, "Failure semantics")."""

from __future__ import annotations

import pytest
import torch

import minipeft as mp
from minipeft.models import tiny_bert, tiny_gpt2, tiny_llama

IDS = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("method", [mp.PromptTuningConfig, mp.PTuningConfig, mp.PrefixTuningConfig])
def test_prompt_longer_than_the_context(method):
    # tiny models have 64 positions: 64 virtual tokens leave no room for a single real token
    with pytest.raises(ValueError, match=r"64 virtual tokens \+ 1 input tokens = 65 positions.*has 64"):
        mp.get_peft_model(tiny_gpt2(), method(num_virtual_tokens=64))
    model = mp.get_peft_model(tiny_llama(), method(num_virtual_tokens=60))
    with pytest.raises(ValueError, match=r"60 virtual tokens \+ 10 input tokens = 70.*num_virtual_tokens <= 54"):
        model(input_ids=IDS)


@pytest.mark.parametrize("method", [mp.PromptTuningConfig, mp.PTuningConfig, mp.PrefixTuningConfig])
def test_zero_virtual_tokens(method):
    with pytest.raises(ValueError, match="num_virtual_tokens must be >= 1"):
        method(num_virtual_tokens=0)


@pytest.mark.parametrize("method", [mp.AdapterConfig, mp.ParallelAdapterConfig])
def test_bottleneck_of_size_zero(method):
    with pytest.raises(ValueError, match=r"bottleneck_size must be a positive integer.*size 0"):
        method(bottleneck_size=0)


def test_reduction_factor_that_leaves_no_bottleneck():
    with pytest.raises(ValueError, match=r"64 // 128 = 0.*reduction_factor <= 64"):
        mp.get_peft_model(tiny_gpt2(), mp.AdapterConfig(reduction_factor=128))


def test_adapter_placement_for_an_unknown_architecture():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no default targets.*pass target_modules"):
        mp.get_peft_model(model, mp.AdapterConfig(bottleneck_size=2))


@pytest.mark.parametrize(
    "make,targets", [(tiny_gpt2, ["ln_1", "c_attn"]), (tiny_llama, ["mlp"]), (tiny_bert, ["word_embeddings"])]
)
def test_ia3_targets_that_are_not_linear(make, targets):
    base = make()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    types = {n: type(m) for n, m in base.named_modules()}
    with pytest.raises(TypeError, match=r"IA3Layer adapts Linear, .*; these targets are not: \{.*\}"):
        mp.get_peft_model(base, mp.IA3Config(target_modules=targets))
    assert {n: type(m) for n, m in base.named_modules()} == types, "a refused call leaves every module as it was"
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())


def test_ia3_feedforward_modules_outside_the_targets():
    config = mp.IA3Config(target_modules=["c_attn"], feedforward_modules=["mlp.c_proj"])
    with pytest.raises(ValueError, match=r"subset of target_modules.*mlp\.c_proj"):
        mp.get_peft_model(tiny_gpt2(), config)


def test_text_init_needs_text_and_tokenizer():
    with pytest.raises(ValueError, match="needs prompt_tuning_init_text and tokenizer_name_or_path"):
        mp.PromptTuningConfig(prompt_tuning_init="TEXT")


def test_positional_input_ids_are_refused_by_prompt_methods():
    model = mp.get_peft_model(tiny_gpt2(), mp.PromptTuningConfig(num_virtual_tokens=3))
    with pytest.raises(ValueError, match=r"input_ids=\.\.\. .*by keyword"):
        model(IDS)


def test_prefix_with_a_cache_of_its_own():
    model = mp.get_peft_model(tiny_gpt2(), mp.PrefixTuningConfig(num_virtual_tokens=3))
    cache = model(input_ids=IDS, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="supplies past_key_values itself"):
        model(input_ids=IDS, past_key_values=cache)


@pytest.mark.parametrize("config", [mp.PromptTuningConfig(num_virtual_tokens=3), mp.AdapterConfig(bottleneck_size=4)])
def test_methods_that_cannot_merge_say_so(config):
    model = mp.get_peft_model(tiny_gpt2(), config)
    with pytest.raises((ValueError, NotImplementedError), match="cannot be merged"):
        model.merge_adapter()
