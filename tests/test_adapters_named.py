"""Named adapters: several live in one model, are switched, saved, loaded and deleted."""

from __future__ import annotations

import pytest
import torch

import minipeft as mp
from minipeft.models import tiny_gpt2
from tests.cases import outputs

IDS = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(2))


def two_adapter_model():
    model = mp.get_peft_model(tiny_gpt2(), mp.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    torch.manual_seed(5)
    model.add_adapter("other", mp.LoraConfig(r=4, target_modules=["c_fc"], init_lora_weights=False))
    return model


def test_switching_adapters_changes_outputs_and_trainables():
    model = two_adapter_model()
    first = outputs(model, IDS)
    assert {k.split(".")[-3] for k, p in model.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    model.set_adapter("other")
    second = outputs(model, IDS)
    assert not torch.allclose(first, second)
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".other." in k and "c_fc" in k for k in trainable)
    model.set_adapter("default")
    torch.testing.assert_close(outputs(model, IDS), first, rtol=0, atol=0)


def test_save_all_and_load_one_by_name(tmp_path):
    model = two_adapter_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (
        tmp_path / "other" / "adapter_model.safetensors"
    ).is_file()
    model.set_adapter("other")
    expected = outputs(model, IDS)
    fresh = mp.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    fresh.load_adapter(tmp_path / "other", "other")
    fresh.set_adapter("other")
    torch.testing.assert_close(outputs(fresh, IDS), expected, rtol=0, atol=0)


def test_delete_adapter():
    model = two_adapter_model()
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"]
    assert not any(".other." in k for k in model.state_dict())


def test_duplicate_name_is_refused():
    model = two_adapter_model()
    with pytest.raises(ValueError, match="exists already"):
        model.add_adapter("other", mp.LoraConfig(target_modules=["c_attn"]))
