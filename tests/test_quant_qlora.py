"""QLoRA (minipeft/quant/qlora.py): LoRA on NF4 bases via get_peft_model(quantization=...).

References: a plain LoRA model on the dequantized base (same function, so the same outputs
and gradients), the closed-form parameter count, and the NF4 rounding bound for merges."""

from __future__ import annotations

import copy

import pytest
import torch

import minipeft as mp
from minipeft.memory import measure_training_memory
from minipeft.quant import Linear4bit, dequantize_model, nf4_levels
from tests.cases import LINEAR_TARGETS, MODELS, lora_count, outputs

KINDS = sorted(MODELS)
IDS = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))


def qlora(kind: str, identity: bool = False, nf4: mp.NF4Config | None = None):
    base = MODELS[kind]()
    config = mp.LoraConfig(r=4, lora_alpha=8, target_modules=LINEAR_TARGETS[kind], init_lora_weights=identity)
    return base, mp.get_peft_model(copy.deepcopy(base), config, quantization=nf4 or mp.NF4Config())


def lora_on_dequantized(model: mp.PeftModel) -> mp.PeftModel:
    """The same adapted function with full-precision nn.Linear bases."""
    return dequantize_model(copy.deepcopy(model))


@pytest.mark.parametrize("kind", KINDS)
def test_targets_become_4bit_and_counts_match_the_closed_form(kind):
    base, model = qlora(kind)
    wrapped = [m for m in model.modules() if isinstance(m, mp.core.TunerLayer)]
    assert wrapped and all(isinstance(m.base_layer, Linear4bit) for m in wrapped)
    targets = mp.core.find_targets(base, LINEAR_TARGETS[kind])
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == lora_count(base, targets, 4)
    assert total == sum(p.numel() for p in base.parameters()) + trainable


@pytest.mark.parametrize("kind", KINDS)
def test_identity_at_init_and_disable_give_the_quantized_base_exactly(kind):
    base, model = qlora(kind, identity=True)
    quantized = copy.deepcopy(base)
    mp.NF4Config().quantize(quantized, model.peft_config["default"])
    assert torch.equal(outputs(model, IDS), outputs(quantized, IDS))
    _, trained = qlora(kind)
    with trained.disable_adapter():
        assert torch.equal(outputs(trained, IDS), outputs(quantized, IDS))


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_and_gradients_equal_lora_on_the_dequantized_base(kind):
    _, model = qlora(kind)
    reference = lora_on_dequantized(model)
    assert not any(isinstance(m, Linear4bit) for m in reference.modules())
    for m in (model, reference):
        outputs(m, IDS).float().pow(2).mean().backward()
    torch.testing.assert_close(outputs(model, IDS), outputs(reference, IDS), rtol=0, atol=1e-5)
    grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-7)


def test_base_forward_is_the_dequantized_linear():
    linear = torch.nn.Linear(64, 32)
    layer = Linear4bit.from_linear(linear)
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, linear.bias), rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in layer.parameters())


def test_only_adapters_train_and_the_codes_stay_bit_identical():
    _, model = qlora("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained = {k for k, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        outputs(model, IDS).pow(2).mean().backward()
        opt.step()
    after = model.state_dict()
    assert any(k.endswith("nf4_packed") for k in before)
    assert all(torch.equal(v, after[k]) for k, v in before.items() if k not in trained)
    assert all(not torch.equal(before[k], after[k]) for k in trained)


def test_no_full_precision_weight_is_kept_for_backward():
    """Dequantized on the fly in both passes: QLoRA saves exactly what LoRA on a float base saves."""
    _, model = qlora("gpt2")
    reference = lora_on_dequantized(model)
    loss = lambda m: outputs(m, IDS).pow(2).mean()  # noqa: E731
    q, r = measure_training_memory(model, loss), measure_training_memory(reference, loss)
    assert q.activations == r.activations and q.gradients == r.gradients
    assert q.weights < 0.6 * r.weights


def test_merge_re_rounds_within_the_nf4_bound():
    nf4 = mp.NF4Config(double_quant=False)
    _, model = qlora("gpt2", nf4=nf4)
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    expected = layer.base_layer.weight + layer.delta_weight("default")  # (out, in), exact sum
    unmerged = outputs(model, IDS)
    with pytest.warns(UserWarning, match="dequantize_model"):
        model.merge_adapter()
    absmax = expected.reshape(-1, 64).abs().amax(1, keepdim=True)  # (n_blocks, 1)
    err = (layer.base_layer.weight - expected).reshape(-1, 64).abs()
    assert torch.all(err <= absmax * nf4_levels().diff().max() / 2 + 1e-6)
    assert (outputs(model, IDS) - unmerged).abs().max() > 1e-4, "re-rounding changes the function"
    merged = layer.base_layer.weight.clone()
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()
    assert torch.equal(layer.base_layer.weight, merged), "merging again must not add the update twice"


def test_merge_into_the_dequantized_base_is_exact():
    _, model = qlora("llama")
    unmerged = outputs(model, IDS)
    plain = dequantize_model(model).merge_and_unload()
    assert not any(isinstance(m, mp.core.AdapterWrapper) for m in plain.modules())
    torch.testing.assert_close(outputs(plain, IDS), unmerged, rtol=0, atol=1e-5)


def test_save_load_round_trip_into_a_freshly_quantized_base(tmp_path):
    base, model = qlora("gpt2")
    model.save_pretrained(tmp_path)
    saved = mp.core.io.load_adapter_files(tmp_path)[1]
    assert set(saved) == set(model.adapter_state_dict()) and all("lora_" in k for k in saved)
    fresh = copy.deepcopy(base)
    mp.NF4Config().quantize(fresh, model.peft_config["default"])
    loaded = mp.PeftModel.from_pretrained(fresh, tmp_path)
    assert torch.equal(outputs(loaded, IDS), outputs(model, IDS))


def test_all_linear_leaves_the_head_and_modules_to_save_in_float():
    base = MODELS["llama"]()
    config = mp.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["down_proj"])
    model = mp.get_peft_model(base, config, quantization=mp.NF4Config(target_modules="all-linear"))
    quantized = {
        n.removesuffix(".base_layer").rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, Linear4bit)
    }
    assert quantized == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"}
    assert isinstance(model.base_model.model.lm_head, torch.nn.Linear)


def test_bad_input():
    with pytest.raises(TypeError, match="NF4Config.blocksize must be"):
        mp.NF4Config(blocksize="64")
    with pytest.raises(TypeError, match="NF4 quantizes nn.Linear or Conv1D layers; 'transformer.h.0.ln_1'"):
        mp.get_peft_model(
            MODELS["gpt2"](),
            mp.LoraConfig(target_modules=["c_attn"]),
            quantization=mp.NF4Config(target_modules=["h.0.ln_1"]),
        )
    with pytest.raises(ValueError, match="blocksize=100 does not divide"):
        mp.get_peft_model(
            MODELS["gpt2"](), mp.LoraConfig(target_modules=["c_attn"]), quantization=mp.NF4Config(blocksize=100)
        )
