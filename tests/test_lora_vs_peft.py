"""LoRA against HF peft (the independent reference): same counts, same outputs with the
same weights, adapter files readable both ways, on tiny GPT-2 (Conv1D) and LLaMA-style."""

from __future__ import annotations

import peft
import pytest
import torch

import minipeft as mp
from tests.cases import MODELS, outputs

IDS = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(1))
SETTINGS = [
    ("gpt2", dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"])),
    ("gpt2", dict(r=2, lora_alpha=4, target_modules=["c_attn"], use_rslora=True)),
    ("llama", dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    ("llama", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    ("llama", dict(r=4, lora_alpha=8, target_modules=r".*\.(q|k)_proj")),
]


def both(kind: str, settings: dict):
    ours = mp.get_peft_model(MODELS[kind](), mp.LoraConfig(init_lora_weights=False, **settings))
    theirs = peft.get_peft_model(MODELS[kind](), peft.LoraConfig(init_lora_weights=False, **settings))
    return ours, theirs


@pytest.mark.parametrize("kind,settings", SETTINGS)
def test_same_counts_and_module_names(kind, settings):
    ours, theirs = both(kind, settings)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ours_names = {k for k, p in ours.named_parameters() if p.requires_grad}
    theirs_names = {k for k, p in theirs.named_parameters() if p.requires_grad}
    assert ours_names == theirs_names


@pytest.mark.parametrize("kind,settings", SETTINGS)
def test_same_outputs_with_same_weights(kind, settings):
    ours, theirs = both(kind, settings)
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(outputs(ours, IDS), outputs(theirs, IDS), rtol=0, atol=1e-6)
    ours.merge_adapter()
    merged = theirs.merge_and_unload()
    torch.testing.assert_close(outputs(ours, IDS), outputs(merged, IDS), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind,settings", SETTINGS)
def test_files_load_both_ways(kind, settings, tmp_path):
    ours, theirs = both(kind, settings)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    in_peft = peft.PeftModel.from_pretrained(MODELS[kind](), tmp_path / "ours")
    torch.testing.assert_close(outputs(in_peft, IDS), outputs(ours, IDS), rtol=0, atol=1e-6)
    in_ours = mp.PeftModel.from_pretrained(MODELS[kind](), tmp_path / "theirs")
    torch.testing.assert_close(outputs(in_ours, IDS), outputs(theirs, IDS), rtol=0, atol=1e-6)


def test_modules_to_save_round_trips_with_peft(tmp_path):
    """A classification-style head trained in full is saved under peft's keys."""
    settings = dict(r=4, target_modules=["c_attn"], modules_to_save=["lm_head"])
    ours, _ = both("gpt2", settings)
    with torch.no_grad():
        ours.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    ours.save_pretrained(tmp_path)
    in_peft = peft.PeftModel.from_pretrained(MODELS["gpt2"](), tmp_path)
    torch.testing.assert_close(outputs(in_peft, IDS), outputs(ours, IDS), rtol=0, atol=1e-6)
