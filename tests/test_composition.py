"""Several active adapters of different methods in one model (ARCHITECTURE.md, "Several adapters").

Each composition is checked against the same modules composed by hand with forward hooks on a
plain copy of the base model: a prefix, a parallel adapter and a LoRA at once; an (IA)^3 layer
wrapped around a LoRA layer (the inner wrapper applies first); two LoRAs on one layer. Then the
composed model is saved (one folder per adapter, as peft does), reloaded into a fresh base, and
must give the same outputs. Adapter names equal to module names round-trip and load in HF peft."""

from __future__ import annotations

import copy

import peft
import pytest
import safetensors.torch
import torch
from transformers import DynamicCache

import minipeft as mp
from minipeft.core.layers import TunerLayer
from minipeft.models import tiny_gpt2

IDS = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(0))


def lora_hook(layer, name: str):
    """x -> base(x) + s B A x, from a LoraLayer's tensors (Conv1D base: the input is (..., d_in))."""
    a, b, s = layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]
    return lambda module, args, out: out + s * (args[0] @ a.T @ b.T)


def three_methods() -> mp.PeftModel:
    torch.manual_seed(0)
    model = mp.get_peft_model(tiny_gpt2(), mp.PrefixTuningConfig(num_virtual_tokens=3), "prefix")
    model.add_adapter("par", mp.ParallelAdapterConfig(bottleneck_size=8, init_weights=False))
    model.add_adapter("lora", mp.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    model.set_adapter(["prefix", "par", "lora"])
    return model.eval()


@torch.no_grad()
def by_hand(model: mp.PeftModel) -> torch.Tensor:
    """The same three adapters on a plain copy of the base, written out: LoRA added to c_attn's output,
    s * up(act(down(x))) added to each MLP's output, the prefix passed as a key/value cache."""
    reference = tiny_gpt2()
    inner = model.base_model.model.transformer
    for block, ref in zip(inner.h, reference.transformer.h, strict=True):
        ref.attn.c_attn.register_forward_hook(lora_hook(block.attn.c_attn, "lora"))
        bottleneck, s = block.mlp.adapter["par"], block.mlp.scaling["par"]
        ref.mlp.register_forward_hook(lambda m, args, out, f=bottleneck, s=s: out + s * f(args[0]))
    n, batch = 3, IDS.shape[0]
    table = inner.wte.prompt_encoder["prefix"]()  # (n, L * 2 * d)
    kv = table.view(n, 2, 2, 4, 16).permute(1, 2, 3, 0, 4)  # (L, 2, heads, n, head_dim)
    cache = DynamicCache(ddp_cache_data=[(kv[i, 0].expand(batch, -1, -1, -1), kv[i, 1].expand(batch, -1, -1, -1))
                                         for i in range(2)])  # fmt: skip
    mask = torch.ones(batch, n + IDS.shape[1], dtype=torch.long)
    return reference(input_ids=IDS, past_key_values=cache, attention_mask=mask).logits


def test_prefix_parallel_adapter_and_lora_at_once_equal_the_hand_written_composition():
    model = three_methods()
    assert model.active_adapters == ["prefix", "par", "lora"]
    with torch.no_grad():
        composed = model(input_ids=IDS).logits
    torch.testing.assert_close(composed, by_hand(model), rtol=0, atol=1e-5)
    for alone in ("prefix", "par", "lora"):  # each contributes: dropping any one changes the output
        model.set_adapter([n for n in ("prefix", "par", "lora") if n != alone])
        with torch.no_grad():
            assert not torch.allclose(model(input_ids=IDS).logits, composed, atol=1e-4)


def test_all_active_adapters_train():
    model = three_methods().train()
    names = {k for k, p in model.named_parameters() if p.requires_grad}
    assert any(".prompt_encoder.prefix." in k for k in names), names
    assert any(".adapter.par." in k for k in names) and any(".lora_A.lora." in k for k in names)
    model.set_adapter("lora")
    assert all(".lora" in k for k, p in model.named_parameters() if p.requires_grad)


def test_composition_saves_one_folder_per_adapter_and_reloads(tmp_path):
    model = three_methods()
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora", "par", "prefix"]
    loaded = mp.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "prefix", adapter_name="prefix")
    for name in ("par", "lora"):
        loaded.load_adapter(tmp_path / name, name)
    loaded.set_adapter(["prefix", "par", "lora"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, expected, rtol=0, atol=0)


def test_a_layer_wrapped_twice_applies_the_inner_wrapper_first():
    torch.manual_seed(1)
    model = mp.get_peft_model(tiny_gpt2(), mp.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    model.add_adapter("ia3", mp.IA3Config(target_modules=["c_attn"], feedforward_modules=[], init_ia3_weights=False))
    model.set_adapter(["default", "ia3"])
    reference = tiny_gpt2()
    for block, ref in zip(model.base_model.model.transformer.h, reference.transformer.h, strict=True):
        outer = block.attn.c_attn  # IA3Layer around the LoraLayer
        assert type(outer).__name__ == "IA3Layer" and type(outer.base_layer).__name__ == "LoraLayer"
        ref.attn.c_attn.register_forward_hook(lora_hook(outer.base_layer, "default"))
        vector = outer.ia3_l["ia3"].flatten()
        ref.attn.c_attn.register_forward_hook(lambda m, args, out, v=vector: out * v)  # (W x + s B A x) * l
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, reference(input_ids=IDS).logits, rtol=0, atol=1e-5)


def test_a_lora_saved_after_an_ia3_wrapped_its_layer_reloads_and_unloads_to_the_plain_base(tmp_path):
    torch.manual_seed(1)
    model = mp.get_peft_model(tiny_gpt2(), mp.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    model.add_adapter("ia3", mp.IA3Config(target_modules=["c_attn"], feedforward_modules=[], init_ia3_weights=False))
    model.set_adapter(["default", "ia3"])
    model.save_pretrained(tmp_path)
    keys = set(safetensors.torch.load_file(tmp_path / "adapter_model.safetensors"))
    # the LoRA's keys name its site (peft's layout), not the IA3 wrapper around it
    assert keys == {f"base_model.model.transformer.h.{i}.attn.c_attn.lora_{m}.weight" for i in (0, 1) for m in "AB"}
    loaded = mp.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    loaded.load_adapter(tmp_path / "ia3", adapter_name="ia3")
    loaded.set_adapter(["default", "ia3"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits, rtol=0, atol=0)
    plain = model.unload()  # both wrappers gone, innermost first: the base model's own modules again
    assert not any(isinstance(m, TunerLayer) for m in plain.modules())
    expected = tiny_gpt2().state_dict()
    assert plain.state_dict().keys() == expected.keys()
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)


def test_two_loras_on_one_layer_add_up():
    torch.manual_seed(2)
    cfg = mp.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False)
    model = mp.get_peft_model(tiny_gpt2(), cfg, "a")
    model.add_adapter("b", copy.deepcopy(cfg))
    model.set_adapter(["a", "b"])
    reference = tiny_gpt2()
    for block, ref in zip(model.base_model.model.transformer.h, reference.transformer.h, strict=True):
        for name in ("a", "b"):
            ref.attn.c_attn.register_forward_hook(lora_hook(block.attn.c_attn, name))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, reference(input_ids=IDS).logits, rtol=0, atol=1e-5)
        model.merge_adapter()  # both active adapters fold in
        torch.testing.assert_close(model(input_ids=IDS).logits, reference(input_ids=IDS).logits, rtol=0, atol=1e-5)


def test_two_prompt_style_adapters_at_once_are_refused():
    model = mp.get_peft_model(tiny_gpt2(), mp.PromptTuningConfig(num_virtual_tokens=2), "p")
    model.add_adapter("q", mp.PrefixTuningConfig(num_virtual_tokens=2))
    model.set_adapter(["p", "q"])
    with pytest.raises(ValueError, match="prompt-style and active at once"):
        model(input_ids=IDS)


@pytest.mark.parametrize("name", ["attn", "h", "c_attn", "lora_A", "weight"])
def test_adapter_named_like_a_module_round_trips_and_loads_in_peft(name, tmp_path):
    torch.manual_seed(3)
    model = mp.get_peft_model(tiny_gpt2(), mp.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    model.add_adapter(name, mp.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    model.set_adapter(name)
    assert set(model.adapter_state_dict(name)) == set(model.adapter_state_dict("default"))
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path)
    ours = mp.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / name, adapter_name=name)
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / name, adapter_name=name)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(theirs(input_ids=IDS).logits, expected, rtol=0, atol=1e-5)


def test_a_layer_exposes_one_adapters_contribution():
    torch.manual_seed(4)
    model = mp.get_peft_model(tiny_gpt2(), mp.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        result = layer.base_layer(x)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        torch.testing.assert_close(layer.contribution(x, result, "default"), layer.scaling["default"] * x @ a.T @ b.T)
