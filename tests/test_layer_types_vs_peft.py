"""HF peft parity on every (method, layer type) pair peft supports beyond nn.Linear: LoRA, DoRA, LoHa,
LoKr and (IA)^3 on nn.Embedding, nn.Conv1d and nn.Conv2d (the model and pairs of tests/test_layer_types.py).
Same trainable counts, same outputs with the same weights (copied across through the adapter files, in
both directions), and peft refuses the same pairs minipeft refuses."""

from __future__ import annotations

import copy

import pytest
import torch

import minipeft as mp
from tests.test_layer_types import IDS, PAIRS, UNSUPPORTED, TinyConvNet, config

peft = pytest.importorskip("peft")
# peft 0.21 builds LoKr's CP layout on an nn.Conv1d but cannot run it (torch.kron on a strided view in make_kron)
PEFT_RUNS = [pair for pair in PAIRS if pair != ("lokr_cp", "conv1")]


def peft_config(method: str, target: str):
    """peft's config for the same adapter as `config(method, target)` (random init: a non-zero update)."""
    ours = config(method, target)
    if method in ("lora", "dora"):
        return peft.LoraConfig(r=ours.r, lora_alpha=ours.lora_alpha, target_modules=[target],
                               init_lora_weights=False, use_dora=ours.use_dora)  # fmt: skip
    if method.startswith(("loha", "lokr")):
        cls = peft.LoHaConfig if method.startswith("loha") else peft.LoKrConfig
        return cls(r=ours.r, alpha=ours.alpha, target_modules=[target], init_weights=False,
                   use_effective_conv2d=ours.use_effective_conv2d)  # fmt: skip
    return peft.IA3Config(target_modules=[target], feedforward_modules=ours.feedforward_modules,
                          init_ia3_weights=False)  # fmt: skip


def logits(model) -> torch.Tensor:
    return model(input_ids=IDS).logits


@pytest.mark.parametrize("method,target", PAIRS)
def test_counts_equal_peft(method, target):
    ours = mp.get_peft_model(TinyConvNet(), config(method, target, identity=True))
    theirs = peft.get_peft_model(TinyConvNet(), peft_config(method, target))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize("method,target", PEFT_RUNS)
def test_files_load_both_ways(method, target, tmp_path):
    """A file minipeft wrote gives the same outputs in peft, and a file peft wrote the same in minipeft."""
    ours = mp.get_peft_model(TinyConvNet(), config(method, target))
    theirs = peft.get_peft_model(TinyConvNet(), peft_config(method, target))
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    in_peft = peft.PeftModel.from_pretrained(TinyConvNet(), tmp_path / "ours")
    torch.testing.assert_close(logits(in_peft), logits(ours), rtol=0, atol=1e-6)
    in_minipeft = mp.PeftModel.from_pretrained(TinyConvNet(), tmp_path / "theirs")
    torch.testing.assert_close(logits(in_minipeft), logits(theirs), rtol=0, atol=1e-6)
    # merged by each library: the same weights
    merged_ours, merged_theirs = in_minipeft.merge_and_unload().state_dict(), theirs.merge_and_unload().state_dict()
    for key, value in merged_theirs.items():
        torch.testing.assert_close(merged_ours[key], value, rtol=0, atol=1e-5)


CONV3D_CONFIGS = {
    "lora": mp.LoraConfig(r=2, lora_alpha=4, target_modules=["0"], init_lora_weights=False),
    "dora": mp.LoraConfig(r=2, lora_alpha=4, target_modules=["0"], init_lora_weights=False, use_dora=True),
    "ia3": mp.IA3Config(target_modules=["0"], feedforward_modules=[], init_ia3_weights=False),
    "ia3_ff": mp.IA3Config(target_modules=["0"], feedforward_modules=["0"], init_ia3_weights=False),
}


@pytest.mark.parametrize("method", CONV3D_CONFIGS)
def test_conv3d_equals_peft(method, tmp_path):
    """nn.Conv3d goes through the same code as Conv1d/Conv2d (LoRA, DoRA and (IA)^3 adapt it in peft)."""
    base = torch.nn.Sequential(torch.nn.Conv3d(3, 6, kernel_size=(1, 3, 3), stride=(1, 2, 1), padding=1))
    x = torch.randn(2, 3, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    ours = mp.get_peft_model(copy.deepcopy(base), copy.deepcopy(CONV3D_CONFIGS[method]))
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    torch.testing.assert_close(theirs(x), ours(x), rtol=0, atol=1e-6)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    torch.testing.assert_close(ours.merge_and_unload()(x), theirs(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method,target", UNSUPPORTED)
def test_peft_refuses_what_minipeft_refuses(method, target):
    with pytest.raises((TypeError, ValueError)):
        peft.get_peft_model(TinyConvNet(), peft_config(method, target))
    with pytest.raises(TypeError):
        mp.get_peft_model(TinyConvNet(), config(method, target))


@pytest.mark.parametrize("use_dora", [False, True])
def test_scaled_embedding_equals_peft(use_dora, tmp_path):
    """An embedding that multiplies its lookups (Gemma 3's `embed_scale`) scales the adapter's lookups too."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    torch.manual_seed(0)
    base = torch.nn.Sequential(Gemma3TextScaledWordEmbedding(50, 8, padding_idx=0, embed_scale=8**0.5))
    cfg = mp.LoraConfig(r=2, lora_alpha=4, target_modules=["0"], init_lora_weights=False, use_dora=use_dora)
    ours = mp.get_peft_model(copy.deepcopy(base), cfg)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours(ids), theirs(ids), rtol=1e-6, atol=1e-6)  # the scale is applied elsewhere
    torch.testing.assert_close(ours.merge_and_unload()(ids), theirs(ids), rtol=0, atol=1e-5)
