"""Bad input to chapter 07's methods gets a clear error naming what was wrong and what would be right."""

from __future__ import annotations

import pytest
import torch

import minipeft as mp
from minipeft.models import tiny_gpt2

# tiny_gpt2: c_attn is 64 -> 192, so min(d_in, d_out) = 64.
TOO_HIGH = [
    mp.LoraConfig(r=65, target_modules=["c_attn"], use_dora=True),
    mp.LoHaConfig(r=65, target_modules=["c_attn"]),
    mp.AdaLoraConfig(init_r=65, target_r=8, total_step=10, target_modules=["c_attn"]),
]


@pytest.mark.parametrize("config", TOO_HIGH, ids=lambda c: type(c).__name__)
def test_rank_above_min_of_the_layer_warns(config):
    with pytest.warns(UserWarning, match=r"r=65 exceeds min\(d_out, fan_in\) = min\(192, 64\).*r <= 64"):
        mp.get_peft_model(tiny_gpt2(), config)


def test_pissa_rank_above_min_is_refused_and_the_model_is_unchanged():
    base = tiny_gpt2()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=r"PiSSA needs r <= min\(d_out, d_in\) = 64 .*got r=65"):
        mp.get_peft_model(base, mp.LoraConfig(r=65, target_modules=["c_attn"], init_lora_weights="pissa"))
    after = base.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_kronecker_factor_must_divide_the_shape():
    with pytest.raises(ValueError, match=r"decompose_factor=5 does not divide d_out=192.*divisor of 192"):
        mp.get_peft_model(tiny_gpt2(), mp.LoKrConfig(decompose_factor=5, target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="decompose_factor must be -1 or a positive divisor"):
        mp.LoKrConfig(decompose_factor=0)


def test_adalora_target_rank_above_initial_rank():
    with pytest.raises(ValueError, match=r"target_r <= init_r.*target_r=16 > init_r=12"):
        mp.AdaLoraConfig(init_r=12, target_r=16, total_step=100)


def test_adalora_needs_the_schedule_length():
    with pytest.raises(ValueError, match="total_step must be set"):
        mp.AdaLoraConfig()
    with pytest.raises(ValueError, match=r"exceed tinit \+ tfinal = 100"):
        mp.AdaLoraConfig(total_step=100, tinit=60, tfinal=40)


def test_vera_never_stores_its_projection():
    with pytest.raises(ValueError, match="save_projection=False"):
        mp.VeraConfig(save_projection=True)


@pytest.mark.parametrize(
    "make",
    [lambda: mp.VeraConfig(r=0), lambda: mp.LoHaConfig(r=0), lambda: mp.LoKrConfig(r=0)],
    ids=["vera", "loha", "lokr"],
)
def test_rank_below_one(make):
    with pytest.raises(ValueError, match="r must be a positive integer"):
        make()


def test_intrinsic_dimension_below_one():
    with pytest.raises(ValueError, match="intrinsic_dim must be a positive integer"):
        mp.IntrinsicConfig(intrinsic_dim=0)


def test_intrinsic_subspace_of_another_base():
    config = mp.IntrinsicConfig(intrinsic_dim=8, target_modules=["c_attn"])
    config = mp.get_peft_model(tiny_gpt2(), config).peft_config["default"]  # D recorded, as in a saved adapter
    with pytest.raises(ValueError, match=r"projected_size=24576, but the targeted weights of this model hold 55296"):
        mp.get_peft_model(tiny_gpt2(n_embd=96), config)


@pytest.mark.parametrize("field,value", [("init_r", "12"), ("beta1", None), ("total_step", 1.5)])
def test_adalora_field_of_the_wrong_type(field, value):
    with pytest.raises(TypeError, match=f"AdaLoraConfig.{field} must be"):
        mp.AdaLoraConfig(**{"total_step": 100, field: value})


@pytest.mark.parametrize(
    "field,value", [("beta1", 1.5), ("beta2", -0.1), ("deltaT", 0), ("tinit", -1), ("orth_reg_weight", -0.5)]
)
def test_adalora_numbers_out_of_range_are_refused_with_the_field(field, value):
    with pytest.raises(ValueError, match=rf"AdaLoraConfig.{field} must be .*got {value}"):
        mp.AdaLoraConfig(total_step=100, **{field: value})
