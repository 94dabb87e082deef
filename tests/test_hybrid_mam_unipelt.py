"""MAM (He et al., 2022) and UniPELT (Mao et al., 2022), chapter 08: each equals the library's own parts
composed by hand under the same weights; UniPELT's gates are checked against plain-torch formulas, at
the place the paper puts each of them. The shared properties (training, disable, save/load, counts)
run in test_properties.py through tests/cases_hybrid_mam_unipelt.py."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from transformers import DynamicCache, ViTConfig, ViTModel

import minipeft as mp
from minipeft.core.layers import innermost
from minipeft.hybrid.mam import MAMConfig
from minipeft.hybrid.unipelt import Gate, GatedPrefixCache, GateLayer, UniPELTConfig, UniPELTGates, gate_values
from minipeft.models import tiny_gpt2, tiny_llama
from tests.cases import MODELS, outputs
from tests.test_architectures import FAMILIES

IDS = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
SMALL = dict(num_virtual_tokens=5, encoder_hidden_size=16)  # the prefix at tiny scale


def file_key(key: str) -> str:
    """A tensor's key without the wrappers' `base_layer` levels: the same tensor in a model wrapped otherwise."""
    return re.sub(r"(\.base_layer)+\.", ".", key)


def copy_adapter(target: mp.PeftModel, names: list[str], source: mp.PeftModel, source_name: str = "default") -> None:
    """Give the target's adapters `names` the source adapter's tensors (matched by file key)."""
    tensors = {file_key(k): v for k, v in source.adapter_state_dict(source_name).items()}
    with torch.no_grad():
        for name in names:
            for key, param in target.adapter_state_dict(name).items():
                param.copy_(tensors.pop(file_key(key)))
    assert all(".gate." in k or ".prefix_gate." in k for k in tensors), f"not copied: {sorted(tensors)[:3]}"


def gates(model: mp.PeftModel) -> list[Gate]:
    return [m for m in model.modules() if isinstance(m, Gate)]


def fix_gates(model: mp.PeftModel, value: float, kind: str | None = None) -> None:
    """Make every gate (or those of one part: "lora", "adapter", "prefix") the constant `value`: w = 0, b = logit."""
    for layer in [m for m in model.modules() if isinstance(m, GateLayer)]:
        chosen = [g for n, g in layer.gate.items() if kind in (None, layer.part[n])]
        chosen += list(layer.prefix_gate.values()) if kind in (None, "prefix") else []
        with torch.no_grad():
            for gate in chosen:
                gate.weight.zero_()
                gate.bias.fill_(30.0 if value == 1 else math.log(value / (1 - value)))  # sigmoid(30) is 1.0 in fp32


def build(family: str) -> torch.nn.Module:
    """The same random tiny model of a family on every call."""
    torch.manual_seed(0)
    return FAMILIES[family]().eval()


def composition(base, config: UniPELTConfig) -> mp.PeftModel:
    """LoRA (alpha = r) + prefix + Pfeiffer adapter, the library's own methods, all active."""
    model = mp.get_peft_model(base, mp.LoraConfig(r=config.r, lora_alpha=config.r, init_lora_weights=False), "l")
    model.add_adapter("p", mp.PrefixTuningConfig(**SMALL))
    model.add_adapter("a", mp.AdapterConfig(placement="pfeiffer", reduction_factor=16, init_weights=False))
    model.set_adapter(["l", "p", "a"])
    return model


def test_defaults_are_the_papers():
    prefix, adapter = MAMConfig().parts()
    assert (prefix.num_virtual_tokens, prefix.encoder_hidden_size, prefix.prefix_projection) == (30, 800, True)
    assert (adapter.bottleneck_size, adapter.scaling, adapter.non_linearity) == (512, 4.0, "relu")
    lora, prefix, adapter, _ = UniPELTConfig().parts()
    assert (lora.r, lora.scaling, lora.target_modules) == (8, 1.0, None)  # q and v; the gate is the scale
    assert (prefix.num_virtual_tokens, prefix.encoder_hidden_size) == (10, 512)
    assert (adapter.placement, adapter.reduction_factor) == ("pfeiffer", 16)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_mam_equals_prefix_plus_parallel_adapter_built_by_hand(kind):
    mam = mp.get_peft_model(MODELS[kind](), MAMConfig(**SMALL, bottleneck_size=8, init_weights=False))
    hand = mp.get_peft_model(MODELS[kind](), mp.PrefixTuningConfig(**SMALL), "p")
    hand.add_adapter("a", mp.ParallelAdapterConfig(bottleneck_size=8, scaling=4.0, init_weights=False))
    hand.set_adapter(["p", "a"])
    copy_adapter(hand, ["p", "a"], mam)
    with torch.no_grad():
        expected = outputs(hand, IDS)
        torch.testing.assert_close(outputs(mam, IDS), expected, rtol=0, atol=0)
        hand.set_adapter("p")
        assert not torch.allclose(outputs(hand, IDS), expected), "the parallel adapter must matter in this test"


def test_mam_folds_its_prefix_and_round_trips(tmp_path):
    model = mp.get_peft_model(tiny_gpt2(), MAMConfig(**SMALL, bottleneck_size=8, init_weights=False))
    with torch.no_grad():
        before = outputs(model, IDS)
    trainable = model.get_nb_trainable_parameters()[0]
    mp.fold_prompt_encoder(model)
    assert model.peft_config["default"].prefix_projection is False
    n, layers, d = 5, 2, 64
    mlp = (d * 16 + 16) + (16 * layers * 2 * d + layers * 2 * d)  # P' and the MLP are replaced by the (n, L 2 d) table
    assert model.get_nb_trainable_parameters()[0] == trainable - (n * d + mlp) + n * layers * 2 * d
    model.save_pretrained(tmp_path)
    loaded = mp.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(outputs(model, IDS), before, rtol=0, atol=1e-6)
        torch.testing.assert_close(outputs(loaded, IDS), before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "vit"])
def test_unipelt_with_open_gates_is_the_plain_composition(family):
    config = UniPELTConfig(r=4, **SMALL, init_weights=False)
    unipelt = mp.get_peft_model(build(family), config)
    hand = composition(build(family), config)
    copy_adapter(hand, ["l", "p", "a"], unipelt)
    fix_gates(unipelt, 1.0)
    with torch.no_grad():
        expected = outputs(hand, IDS)
        torch.testing.assert_close(outputs(unipelt, IDS), expected, rtol=0, atol=1e-5)
        fix_gates(unipelt, 0.5)
        assert not torch.allclose(outputs(unipelt, IDS), expected, atol=1e-3), "the gates must matter"


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("part", ["lora", "adapter", "prefix"])
def test_each_gate_scales_its_own_part(part, kind):
    """One part's gates at c, the others at 1: the composition with that part scaled by c by hand
    (LoRA: alpha = c r; adapter: c W_up, c b_up; prefix: c P_k, c P_v in the folded table)."""
    c = 0.3
    config = UniPELTConfig(r=4, **SMALL, init_weights=False)
    unipelt = mp.get_peft_model(MODELS[kind](), config)
    hand = composition(MODELS[kind](), config)
    copy_adapter(hand, ["l", "p", "a"], unipelt)
    fix_gates(unipelt, 1.0)
    fix_gates(unipelt, c, part)
    with torch.no_grad():
        if part == "lora":
            for layer in [m for m in hand.modules() if isinstance(m, mp.core.TunerLayer) and "l" in m.adapter_names()]:
                layer.scaling["l"] *= c
        elif part == "adapter":
            for layer in [m for m in hand.modules() if hasattr(m, "adapter") and "a" in m.adapter]:
                layer.adapter["a"].up.weight.mul_(c)
                layer.adapter["a"].up.bias.mul_(c)
        else:
            mp.fold_prompt_encoder(hand, "p")
            hand.get_input_embeddings().prompt_encoder["p"].weight.mul_(c)  # (n, L * 2 * d_kv): every key and value
        torch.testing.assert_close(outputs(unipelt, IDS), outputs(hand, IDS), rtol=0, atol=1e-5)


def test_a_gate_is_one_number_per_example_from_its_parts_input():
    """Plain torch, from the layer's own weights: LoRA W x + G(x) B A x, adapter h + G(h) f(h) with h = W x,
    G(x) = mean_t sigmoid(w . x_t + b), on examples that get different gates."""
    model = mp.get_peft_model(tiny_llama(), UniPELTConfig(r=4, **SMALL, init_weights=False))
    layers = dict(model.base_model.model.model.layers[0].self_attn.named_children())
    q, down = layers["q_proj"], model.base_model.model.model.layers[0].mlp.down_proj
    torch.manual_seed(1)
    for gate in gates(model):
        torch.nn.init.normal_(gate.weight, std=0.5)
    x = torch.randn(3, 5, 64)  # (B, T, d)

    def g(gate: Gate, inp: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(inp @ gate.weight.T + gate.bias).mean(dim=1, keepdim=True)  # (B, 1, 1)

    with torch.no_grad():
        lora = q.base_layer
        w0, a, b = lora.base_layer.weight, lora.lora_A["default"].weight, lora.lora_B["default"].weight
        expected = x @ w0.T + g(q.gate["default"], x) * (x @ a.T @ b.T)
        torch.testing.assert_close(q(x), expected, rtol=0, atol=1e-5)
        adapter = down.base_layer.adapter["default"]
        xd = torch.randn(3, 5, 128)  # down_proj reads the FFN's (B, T, d_ff)
        h = xd @ down.base_layer.base_layer.weight.T
        expected = h + g(down.gate["default"], h) * adapter.up(torch.relu(adapter.down(h)))
        torch.testing.assert_close(down(xd), expected, rtol=0, atol=1e-5)
        assert q.gate["default"].last.unique().numel() == 3, "each example gets its own gate"


def test_the_prefix_gate_scales_the_prefix_keys_and_values_only():
    site = GateLayer(tiny_gpt2().transformer.h[0].attn.c_attn)
    prefix_k, prefix_v = torch.randn(2, 4, 3, 16), torch.randn(2, 4, 3, 16)  # (B, heads, n, hd)
    cache = GatedPrefixCache(DynamicCache(ddp_cache_data=[(prefix_k, prefix_v)]), [site], "u", 3)
    site.pending["u"] = torch.tensor([0.25, 0.75])  # (B,)
    k, v = torch.randn(2, 4, 5, 16), torch.randn(2, 4, 5, 16)
    keys, values = cache.update(k, v, 0)
    g = torch.tensor([0.25, 0.75])[:, None, None, None]
    torch.testing.assert_close(keys, torch.cat([g * prefix_k, k], dim=2), rtol=0, atol=0)
    torch.testing.assert_close(values, torch.cat([g * prefix_v, v], dim=2), rtol=0, atol=0)
    assert torch.equal(cache.layers[0].keys[:, :, :3], prefix_k), "the cache keeps the prefix unscaled"
    assert "u" not in site.pending, "the gate is taken once, by its own layer's attention"



@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_gates_start_near_one_half_reading_the_inputs_the_paper_names(kind):
    """At init (w ~ N(0, 0.02^2), b = 0) each gate is mean_t sigmoid(w . x_t), x the input of its part: the
    projection's input (LoRA; the query's is the attention's: the prefix), the FFN's output (adapter)."""
    model = mp.get_peft_model(MODELS[kind](), UniPELTConfig(r=4, **SMALL))
    seen = {}
    for layer in [m for m in model.modules() if isinstance(m, GateLayer)]:
        base = innermost(layer)
        base.register_forward_hook(lambda mod, args, out, layer=layer: seen.__setitem__(layer, (args[0], out)))
    with torch.no_grad():
        model(input_ids=IDS)
        for layer, (x, h) in seen.items():
            parts = [(g, h if layer.part[n] == "adapter" else x) for n, g in layer.gate.items()]
            for gate, reads in parts + [(g, x) for g in layer.prefix_gate.values()]:
                expected = torch.sigmoid(reads @ gate.weight.T + gate.bias).mean(dim=1)[:, 0]  # (B,)
                torch.testing.assert_close(gate.last, expected, rtol=0, atol=1e-6)
    values = [v for parts in gate_values(model).values() for v in parts.values()]
    assert len(values) == 2 * (3 if kind == "gpt2" else 4)  # per layer: LoRA site(s), prefix, adapter
    assert all(0.35 < v < 0.65 for v in values), values


def test_gates_train():
    model = mp.get_peft_model(tiny_gpt2(), UniPELTConfig(r=4, **SMALL, init_weights=False)).train()
    before = [g.weight.detach().clone() for g in gates(model)]
    assert all(p.requires_grad for g in gates(model) for p in g.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        outputs(model, IDS).pow(2).mean().backward()
        opt.step()
    assert all(not torch.equal(b, g.weight) for b, g in zip(before, gates(model), strict=True))


def test_gate_values_per_layer_and_part():
    model = mp.get_peft_model(tiny_llama(), UniPELTConfig(r=4, **SMALL))
    with pytest.raises(ValueError, match="call the model on a batch first"):
        gate_values(model)
    with pytest.raises(ValueError, match="not a UniPELT adapter"):
        gate_values(model, "other")
    fix_gates(model, 0.2, "adapter")
    model(input_ids=IDS)
    values = gate_values(model)
    assert sorted(values) == [0, 1]
    assert sorted(values[0]) == ["adapter", "lora.q_proj", "lora.v_proj", "prefix"]
    assert values[1]["adapter"] == pytest.approx(0.2)


def test_deleting_unipelt_removes_its_gates_and_parts():
    reference = mp.get_peft_model(tiny_gpt2(), mp.LoraConfig(r=4, init_lora_weights=False), "a")
    model = copy.deepcopy(reference)
    model.add_adapter("u", UniPELTConfig(r=4, **SMALL, init_weights=False))
    model.set_adapter(["a", "u"])
    assert model.adapter_state_dict("u")
    with pytest.warns(UserWarning, match="deleting the active adapter"):
        model.delete_adapter("u")
    assert model.active_adapters == ["a"] and not model.adapter_state_dict("u")
    assert not any("gate" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(outputs(model, IDS), outputs(reference, IDS), rtol=0, atol=1e-6)


def test_generate_starts_from_the_full_forward_pass():
    model = mp.get_peft_model(tiny_gpt2(), UniPELTConfig(r=4, **SMALL, init_weights=False))
    with torch.no_grad():
        first = outputs(model, IDS)[:, -1].argmax(-1)  # (B,)
        out = model.generate(input_ids=IDS, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, IDS.shape[1] + 3) and torch.equal(out[:, : IDS.shape[1]], IDS)
    assert torch.equal(out[:, IDS.shape[1]], first)


def unchanged(base, call) -> str:
    """Run a call that must fail; check that it left `base` as it was. Returns the error message."""
    state = {k: v.clone() for k, v in base.state_dict().items()}
    names = [n for n, _ in base.named_modules()]
    with pytest.raises((ValueError, TypeError)) as error:
        call()
    assert [n for n, _ in base.named_modules()] == names
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in state.items())
    return str(error.value)


def test_bad_input_is_refused_and_changes_nothing():
    with pytest.raises(ValueError, match="UniPELTConfig: target_modules=.*leave it None"):
        UniPELTConfig(target_modules=["c_attn"])
    with pytest.raises(ValueError, match="UniPELTConfig: PrefixTuningConfig.num_virtual_tokens must be >= 1"):
        UniPELTConfig(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="MAMConfig: ParallelAdapterConfig.bottleneck_size"):
        MAMConfig(bottleneck_size=0)
    with pytest.raises(TypeError, match="UniPELTConfig.r must be"):
        UniPELTConfig(r=2.5)
    base = tiny_gpt2()
    assert "build the gates with UniPELTConfig" in unchanged(base, lambda: mp.get_peft_model(base, UniPELTGates()))
    vit = ViTModel(ViTConfig(image_size=16, patch_size=8, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                             num_attention_heads=4))  # fmt: skip
    unchanged(vit, lambda: mp.get_peft_model(vit, UniPELTConfig(r=4, **SMALL)))
    model = mp.get_peft_model(base, UniPELTConfig(r=4, **SMALL, init_weights=False))
    lora = model.base_model.model.transformer.h[0].attn.c_attn.base_layer
    weight = lora.base_layer.weight.clone()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()
    assert torch.equal(lora.base_layer.weight, weight) and not lora.merged_adapters


def test_gates_alone_are_refused_as_a_part_of_unipelt_only():
    base = tiny_llama()
    message = unchanged(base, lambda: mp.get_peft_model(base, UniPELTGates()))
    assert "UniPELT's gates scale the LoRA and adapter parts" in message
