"""Chapter 07's methods against HF peft, the independent reference: equal trainable counts for the
same settings, equal outputs given the same weights, and adapter files that load both ways.
peft adapts nn.Linear only for LoHa/LoKr, so those run on the LLaMA-style model."""

from __future__ import annotations

import peft
import pytest
import torch

import minipeft as mp
from tests.cases import MODELS, outputs

IDS = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(2))
LLAMA = ["q_proj", "v_proj", "down_proj"]
GPT2 = ["c_attn", "c_proj"]

# (name, kind, minipeft config, peft config): the same settings spelled for both libraries.
SETTINGS = [
    ("dora", "gpt2", mp.LoraConfig, peft.LoraConfig, dict(r=4, lora_alpha=8, target_modules=GPT2, use_dora=True)),
    ("dora", "llama", mp.LoraConfig, peft.LoraConfig, dict(r=2, target_modules=LLAMA, use_dora=True, use_rslora=True)),
    (
        "pissa",
        "llama",
        mp.LoraConfig,
        peft.LoraConfig,
        dict(r=4, lora_alpha=8, target_modules=LLAMA, init_lora_weights="pissa"),
    ),
    ("pissa", "gpt2", mp.LoraConfig, peft.LoraConfig, dict(r=2, target_modules=GPT2, init_lora_weights="pissa")),
    ("loha", "llama", mp.LoHaConfig, peft.LoHaConfig, dict(r=4, alpha=8, target_modules=LLAMA)),
    ("lokr", "llama", mp.LoKrConfig, peft.LoKrConfig, dict(r=4, alpha=8, target_modules=LLAMA)),
    (
        "lokr",
        "llama",
        mp.LoKrConfig,
        peft.LoKrConfig,
        dict(r=2, target_modules=LLAMA, decompose_both=True, decompose_factor=4),
    ),
    ("vera", "llama", mp.VeraConfig, peft.VeraConfig, dict(r=16, target_modules=LLAMA, projection_prng_key=7)),
    ("vera", "gpt2", mp.VeraConfig, peft.VeraConfig, dict(r=96, target_modules=GPT2)),
    (
        "adalora",
        "llama",
        mp.AdaLoraConfig,
        peft.AdaLoraConfig,
        dict(init_r=6, target_r=2, total_step=20, target_modules=LLAMA),
    ),
    (
        "adalora",
        "gpt2",
        mp.AdaLoraConfig,
        peft.AdaLoraConfig,
        dict(init_r=4, target_r=4, total_step=5, target_modules=GPT2),
    ),
]
IDS_OF = [f"{name}-{kind}-{i}" for i, (name, kind, *_) in enumerate(SETTINGS)]
# Per method: peft-only settings that make the two configs mean the same thing.
PEFT_EXTRA = {"vera": dict(save_projection=False)}


def both(name, kind, ours_cls, theirs_cls, settings):
    ours = mp.get_peft_model(MODELS[kind](), ours_cls(**settings))
    extra = {**PEFT_EXTRA.get(name, {}), **({"fan_in_fan_out": True} if kind == "gpt2" else {})}
    theirs = peft.get_peft_model(MODELS[kind](), theirs_cls(**settings, **extra))
    return ours, theirs


@torch.no_grad()
def perturb(model) -> None:
    """Make every trainable tensor non-trivial, so that equal outputs mean equal functions."""
    gen = torch.Generator().manual_seed(5)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("name,kind,ours_cls,theirs_cls,settings", SETTINGS, ids=IDS_OF)
def test_same_count_and_outputs_with_same_weights(name, kind, ours_cls, theirs_cls, settings):
    ours, theirs = both(name, kind, ours_cls, theirs_cls, settings)
    assert ours.get_nb_trainable_parameters()[0] == theirs.get_nb_trainable_parameters()[0]
    # At init: PiSSA rewrites both bases to the same residual; the others start at the base model.
    torch.testing.assert_close(outputs(ours, IDS), outputs(theirs, IDS), rtol=0, atol=1e-5)
    perturb(ours)
    result = peft.set_peft_model_state_dict(theirs, ours.adapter_state_dict())
    assert not result.unexpected_keys
    # AdaLoRA: peft divides by (r + 1e-5) where the paper and minipeft divide by r: ~1e-6 relative.
    atol = 1e-5 if name == "adalora" else 1e-6
    torch.testing.assert_close(outputs(ours, IDS), outputs(theirs, IDS), rtol=0, atol=atol)
    ours.merge_adapter()
    torch.testing.assert_close(outputs(ours, IDS), outputs(theirs.merge_and_unload(), IDS), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,kind,ours_cls,theirs_cls,settings", SETTINGS, ids=IDS_OF)
def test_files_load_both_ways(name, kind, ours_cls, theirs_cls, settings, tmp_path):
    ours, theirs = both(name, kind, ours_cls, theirs_cls, settings)
    perturb(ours)
    perturb(theirs)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    in_peft = peft.PeftModel.from_pretrained(MODELS[kind](), tmp_path / "ours")
    torch.testing.assert_close(outputs(in_peft, IDS), outputs(ours, IDS), rtol=0, atol=1e-5)
    in_ours = mp.PeftModel.from_pretrained(MODELS[kind](), tmp_path / "theirs")
    torch.testing.assert_close(outputs(in_ours, IDS), outputs(theirs, IDS), rtol=0, atol=1e-5)


def test_vera_file_holds_no_random_matrices(tmp_path):
    model = mp.get_peft_model(MODELS["gpt2"](), mp.VeraConfig(r=32, target_modules=GPT2))
    model.save_pretrained(tmp_path)
    saved = mp.core.io.load_adapter_files(tmp_path)[1]
    assert saved and all(k.endswith(("vera_lambda_b", "vera_lambda_d")) for k in saved), sorted(saved)
    # 2 layers x (c_attn: 192 + 32, attn.c_proj: 64 + 32, mlp.c_proj: 64 + 32) numbers, nothing of A (32 x 256).
    assert sum(t.numel() for t in saved.values()) == 2 * (192 + 64 + 64 + 3 * 32)
