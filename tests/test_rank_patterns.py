"""peft's `rank_pattern` / `alpha_pattern` (LoRA, LoHa, LoKr): per-module ranks and alphas, keys matched
as peft matches them (a regex ending the module's path at a dot; the first matching key wins). HF peft is
the reference: its files load here with its outputs, ours load there, and the shapes are the patterns'."""

from __future__ import annotations

import peft
import pytest
import safetensors.torch
import torch

import minipeft as mp
from minipeft.models import tiny_gpt2, tiny_llama

IDS = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(0))
# (library configs, base, settings): a per-module rank by exact path and by suffix, an alpha by regex.
CASES = {
    "lora-gpt2": (
        (peft.LoraConfig, mp.LoraConfig),
        tiny_gpt2,
        dict(r=8, lora_alpha=16, init_lora_weights=False, target_modules=["c_attn", "c_fc"],
             rank_pattern={"h.0.attn.c_attn": 4, "c_fc": 2}, alpha_pattern={r"h\.1\..*": 32}),
    ),
    "lora-llama": (
        (peft.LoraConfig, mp.LoraConfig),
        tiny_llama,
        dict(r=8, lora_alpha=16, init_lora_weights=False, target_modules=["q_proj", "v_proj"],
             rank_pattern={"layers.0.self_attn.q_proj": 5}, alpha_pattern={"v_proj": 3.0}),
    ),
    "loha": (
        (peft.LoHaConfig, mp.LoHaConfig),
        tiny_llama,
        dict(r=4, alpha=8, init_weights=False, target_modules=["q_proj", "v_proj"],
             rank_pattern={"q_proj": 2}, alpha_pattern={"layers.1.self_attn.v_proj": 1.5}),
    ),
    "lokr": (
        (peft.LoKrConfig, mp.LoKrConfig),
        tiny_llama,
        dict(r=4, alpha=8, init_weights=False, decompose_both=True, target_modules=["q_proj", "v_proj"],
             rank_pattern={"layers.0.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 2.0}),
    ),
}  # fmt: skip


def shapes(folder) -> dict[str, tuple[int, ...]]:
    """File key -> shape of every tensor of a saved adapter."""
    return {k: tuple(v.shape) for k, v in safetensors.torch.load_file(folder / "adapter_model.safetensors").items()}


@pytest.mark.parametrize("case", CASES)
def test_patterns_equal_hf_peft_both_ways(case, tmp_path):
    (theirs_cls, ours_cls), base, settings = CASES[case]
    torch.manual_seed(0)
    theirs = peft.get_peft_model(base(), theirs_cls(**settings)).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    ours = mp.PeftModel.from_pretrained(base(), tmp_path / "theirs").eval()
    plain = {k: v for k, v in settings.items() if not k.endswith("_pattern")}
    peft.get_peft_model(base(), theirs_cls(**plain)).save_pretrained(tmp_path / "plain")
    assert shapes(tmp_path / "theirs") != shapes(tmp_path / "plain"), "the patterns must change some shapes"
    with torch.no_grad():
        expected = theirs(input_ids=IDS).logits
        torch.testing.assert_close(ours(input_ids=IDS).logits, expected, rtol=0, atol=1e-5)
        # built from our own config (fresh weights), saved, and read by peft: same shapes, same outputs
        torch.manual_seed(1)
        fresh = mp.get_peft_model(base(), ours_cls(**settings)).eval()
        fresh.save_pretrained(tmp_path / "ours")
        assert shapes(tmp_path / "ours") == shapes(tmp_path / "theirs")
        back = peft.PeftModel.from_pretrained(base(), tmp_path / "ours").eval()
        torch.testing.assert_close(back(input_ids=IDS).logits, fresh(input_ids=IDS).logits, rtol=0, atol=1e-5)


def test_the_first_matching_key_wins_and_scaling_follows_alpha():
    cfg = mp.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"],
                        rank_pattern={"h.0.attn.c_attn": 2, r".*c_attn": 4}, alpha_pattern={"c_attn": 4})  # fmt: skip
    model = mp.get_peft_model(tiny_gpt2(), cfg)
    first, second = (block.attn.c_attn for block in model.base_model.model.transformer.h)
    assert first.lora_A["default"].weight.shape[0] == 2 and second.lora_A["default"].weight.shape[0] == 4
    assert first.scaling["default"] == 4 / 2 and second.scaling["default"] == 4 / 4
    assert model.peft_config["default"].rank_pattern == cfg.rank_pattern  # saved as given, resolved per module


@pytest.mark.parametrize(
    "settings, error, match",
    [
        (dict(rank_pattern={"c_attn": 0}), ValueError, r"LoraConfig.rank_pattern\['c_attn'\] must be one of the pos"),
        (dict(rank_pattern={"c_attn": 2.5}), ValueError, r"rank_pattern\['c_attn'\] must be one of the positive"),
        (dict(alpha_pattern={"c_attn": float("nan")}), ValueError, r"alpha_pattern\['c_attn'\] must be one of the fin"),
        (dict(rank_pattern={"(c_attn": 2}), ValueError, r"LoraConfig.rank_pattern key='\(c_attn' is not a valid"),
        (dict(target_modules="(c_attn"), ValueError, r"LoraConfig.target_modules='\(c_attn' is not a valid regular"),
        (dict(rank_pattern={3: 2}), TypeError, r"rank_pattern keys are module names or regexes, got 3"),
    ],
)  # fmt: skip
def test_bad_patterns_are_refused_when_the_config_is_made(settings, error, match):
    with pytest.raises(error, match=match):
        mp.LoraConfig(**settings)


def test_a_pattern_that_backtracks_for_ever_is_stopped_with_a_clear_error(monkeypatch):
    """A regex from a downloaded adapter_config.json must not hang a load: matching has a time bound.
    (a|aa)+b on 34 a's backtracks through ~10^7 paths (seconds); the bound is lowered to keep the test short."""
    from minipeft.core import targets

    monkeypatch.setattr(targets, "REGEX_SECONDS", 0.05)
    model = torch.nn.ModuleDict({"a" * 34: torch.nn.Linear(2, 2)})
    with pytest.raises(ValueError, match=r"target_modules='\(a\|aa\)\+b' took over 0.05 s to match the module name"):
        mp.get_peft_model(model, mp.LoraConfig(r=1, target_modules="(a|aa)+b"))
    assert type(model["a" * 34]) is torch.nn.Linear
