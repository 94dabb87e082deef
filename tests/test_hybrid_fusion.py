"""AdapterFusion and Stack (chapter 08) against plain-torch references of the paper's formula.

Three serial adapters a, b, c (random, as if trained) are fused at their sites on tiny GPT-2 (Conv1D),
LLaMA and BERT models. The reference recomputes, in plain torch from the stored tensors, each adapter's
bottleneck f_n(h) = up(relu(down(h))) and the fusion h + sum_n softmax_n((h Q^T) . (f_n K^T) / T) f_n V^T
(nn.Linear layout), applied with forward hooks on a plain copy of the base model."""

from __future__ import annotations

import pytest
import torch

import minipeft as mp
from minipeft.hybrid.fusion import FusionConfig, FusionLayer, value_regularization
from tests import test_properties
from tests.cases import MODELS, outputs
from tests.cases_hybrid_fusion import CASES, FUSED, fusion_count

KINDS = sorted(MODELS)
IDS = torch.randint(3, 200, (3, 9), generator=torch.Generator().manual_seed(0))


def with_adapters(kind: str, identity: bool = False, placement: str = "pfeiffer") -> mp.PeftModel:
    """A base with the serial adapters a, b, c (random unless identity)."""
    torch.manual_seed(1)
    config = mp.AdapterConfig(bottleneck_size=8, placement=placement, init_weights=identity)
    model = mp.get_peft_model(MODELS[kind](), config, FUSED[0])
    for name in FUSED[1:]:
        model.add_adapter(name, config)
    return model


def fused(kind: str = "gpt2", identity: bool = False, **fusion) -> mp.PeftModel:
    """a, b, c fused by the active adapter "fusion"."""
    model = with_adapters(kind, identity)
    model.add_adapter("fusion", FusionConfig(adapter_names=FUSED, **fusion))
    model.set_adapter("fusion")
    return model


def sites(model: mp.PeftModel) -> dict[str, FusionLayer]:
    return {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, FusionLayer)}


def f(h: torch.Tensor, bottleneck) -> torch.Tensor:
    """An adapter's bottleneck output up(relu(down(h))), from its tensors."""
    return torch.relu(h @ bottleneck.down.weight.T + bottleneck.down.bias) @ bottleneck.up.weight.T + bottleneck.up.bias


def fuse(h: torch.Tensor, layer: FusionLayer, name: str, temperature: float, value=None) -> torch.Tensor:
    """The paper's Sec. 3.2 at one site: h + sum_n s_n f_n V, s = softmax over the adapters of (h Q).(f_n K) / T."""
    fusion, serial = layer.adapter_fusion[name], layer.base_layer
    z = [f(h, serial.adapter[n]) for n in FUSED]  # N x (B, T, d)
    v = fusion.value.weight if value is None else value
    q = h @ fusion.query.weight.T
    scores = torch.stack([(q * (zn @ fusion.key.weight.T)).sum(-1) for zn in z], dim=-1) / temperature  # (B, T, N)
    s = torch.softmax(scores, dim=-1)
    return h + sum(s[..., i : i + 1] * (zn @ v.T) for i, zn in enumerate(z))


@torch.no_grad()
def by_hand(model: mp.PeftModel, kind: str, at_site) -> torch.Tensor:
    """The base model's output with at_site(h, fusion layer) replacing each fused site's output h."""
    reference = MODELS[kind]()
    for name, layer in sites(model).items():
        reference.get_submodule(name).register_forward_hook(lambda m, args, h, layer=layer: at_site(h, layer))
    return outputs(reference, IDS)


def randomize(model: mp.PeftModel) -> None:
    """Fusion weights away from their init, V included, so that every term of the formula counts."""
    with torch.no_grad():
        for layer in sites(model).values():
            for p in layer.adapter_fusion["fusion"].parameters():
                p.normal_(std=0.2)


@pytest.mark.parametrize("kind", KINDS)
def test_fusion_equals_the_papers_formula_in_plain_torch(kind):
    model = fused(kind, temperature=0.7).eval()
    randomize(model)
    with torch.no_grad():
        out = outputs(model, IDS)
    expected = by_hand(model, kind, lambda h, layer: fuse(h, layer, "fusion", 0.7))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    base = by_hand(model, kind, lambda h, layer: h)
    assert not torch.allclose(out, base, atol=1e-3), "the fusion must change the output"


@pytest.mark.parametrize("kind", KINDS)
def test_at_init_v_is_the_identity_and_the_output_mixes_the_adapters(kind):
    model = fused(kind).eval()
    for layer in sites(model).values():
        v = layer.adapter_fusion["fusion"].value.weight
        off = v.detach().clone().fill_diagonal_(0)  # (d, d)
        assert torch.equal(v.diagonal(), torch.ones(v.shape[0])) and 0 < off.abs().max() < 1e-5
    with torch.no_grad():
        out = outputs(model, IDS)
    eye = torch.eye(64)
    torch.testing.assert_close(out, by_hand(model, kind, lambda h, layer: fuse(h, layer, "fusion", 1.0, eye)),
                               rtol=0, atol=1e-5)  # fmt: skip


def test_a_flat_softmax_gives_the_mean_of_the_adapters():
    model = fused(temperature=1e9).eval()  # s uniform: o = mean_n f_n(h) with V = I
    with torch.no_grad():
        out = outputs(model, IDS)
    mean = by_hand(model, "gpt2", lambda h, layer: h + sum(f(h, layer.base_layer.adapter[n]) for n in FUSED) / 3)
    torch.testing.assert_close(out, mean, rtol=0, atol=1e-5)


def test_fusing_copies_of_one_adapter_starts_as_that_adapter():
    model = with_adapters("gpt2")
    with torch.no_grad():
        for layer in model.base_model.model.modules():
            if isinstance(layer, mp.core.TunerLayer) and "a" in layer.adapter_names():
                for name in FUSED[1:]:
                    layer.adapter[name].load_state_dict(layer.adapter["a"].state_dict())
    model.set_adapter("a")
    alone = outputs(model, IDS)
    model.add_adapter("fusion", FusionConfig(adapter_names=FUSED))
    model.set_adapter("fusion")
    torch.testing.assert_close(outputs(model, IDS), alone, rtol=0, atol=1e-5)


def test_trained_to_reproduce_one_adapter_the_fusion_attends_to_it():
    model = with_adapters("gpt2")
    model.set_adapter("b")
    with torch.no_grad():
        target = outputs(model, IDS)  # the model with adapter b alone: the known answer is "attend to b"
    model.add_adapter("fusion", FusionConfig(adapter_names=FUSED))
    model.set_adapter("fusion")
    seen = {}  # site -> the sublayer output h its fusion read last
    for name, layer in sites(model).items():
        layer.base_layer.register_forward_hook(lambda m, args, h, name=name: seen.__setitem__(name, (args[0], h)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(60):
        loss = (outputs(model, IDS) - target).pow(2).mean()
        opt.zero_grad()
        (loss + value_regularization(model, "fusion")).backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 4
    with torch.no_grad():
        outputs(model, IDS)
        for name, layer in sites(model).items():
            x, h = seen[name]
            z = torch.stack([layer.base_layer.contribution(x, h, n) for n in FUSED], dim=-2)  # (B, T, 3, d)
            weights = layer.adapter_fusion["fusion"].attention(h, z, 1.0).mean((0, 1))  # (3,)
            assert weights[1] > 0.8, (name, weights)


# -- the property suite's own checks, on fused models ----------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "check",
    [
        test_properties.test_only_adapter_parameters_train,
        test_properties.test_identity_at_init,
        test_properties.test_disable_adapter_gives_base_output_exactly,
    ],
    ids=lambda check: check.__name__,
)
def test_property_suite_on_a_fused_model(check, kind, monkeypatch):
    monkeypatch.setattr(test_properties, "build", lambda method, kind, identity: (
        MODELS[kind](), fused(kind, identity), []))  # fmt: skip
    check("ADAPTER_FUSION", kind)


def test_only_fusion_parameters_have_requires_grad_and_get_gradients():
    model = fused().train()
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable == {k for k in model.state_dict() if ".adapter_fusion.fusion." in k}
    assert len(trainable) == 3 * 2  # Q, K, V at the 2 sites
    outputs(model, IDS).pow(2).mean().backward()
    for key, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (key in trainable), key


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("placement,per_block", [("pfeiffer", 1), ("houlsby", 2)])
def test_counts_match_the_closed_form(kind, placement, per_block):
    model = with_adapters(kind, placement=placement)
    model.add_adapter("fusion", FusionConfig(adapter_names=FUSED))
    model.set_adapter("fusion")
    base = MODELS[kind]()
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == fusion_count(base, per_block) == 3 * 64 * 64 * 2 * per_block
    if per_block == 1:
        assert trainable == CASES["ADAPTER_FUSION"].closed_form(base, [], model.peft_config["fusion"])
    adapters = 3 * per_block * 2 * (2 * 64 * 8 + 8 + 64)  # three adapters, 2 d m + m + d per site
    assert total == sum(p.numel() for p in base.parameters()) + adapters + trainable


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(kind, tmp_path):
    model = fused(kind).eval()
    randomize(model)
    expected = outputs(model, IDS)
    model.save_pretrained(tmp_path)
    saved = mp.core.io.load_adapter_files(tmp_path / "fusion")[1]
    assert set(saved) == {f"base_model.model.{s}.adapter_fusion.{p}.weight" for s in sites(model)
                          for p in ("query", "key", "value")}  # fmt: skip
    loaded = mp.PeftModel.from_pretrained(MODELS[kind](), tmp_path / "a", "a")
    for name in [*FUSED[1:], "fusion"]:
        loaded.load_adapter(tmp_path / name, name, is_trainable=name == "fusion")
    loaded.set_adapter("fusion")
    torch.testing.assert_close(outputs(loaded.eval(), IDS), expected, rtol=0, atol=0)
    trainable = {k for k, p in loaded.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter_fusion.fusion." in k for k in trainable)


def test_mixed_batch_rows_equal_each_adapter_alone():
    model = fused().eval()
    randomize(model)
    names = ["fusion", "a", "__base__"]
    with torch.no_grad():
        mixed = model(input_ids=IDS, adapter_names=names).logits
        for row, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(input_ids=IDS).logits
            else:
                model.set_adapter(name)
                alone = model(input_ids=IDS).logits
            torch.testing.assert_close(mixed[row], alone[row], rtol=0, atol=1e-5)


def test_unload_gives_the_plain_base():
    model = fused()
    plain = model.unload()
    assert not any(isinstance(m, mp.core.AdapterWrapper) for m in plain.modules())
    assert torch.equal(outputs(plain, IDS), outputs(MODELS["gpt2"](), IDS))


def test_value_regularization_is_the_l2_distance_of_v_to_the_identity():
    model = fused(regularization_weight=0.5)
    randomize(model)
    values = [layer.adapter_fusion["fusion"].value.weight for layer in sites(model).values()]
    penalty = value_regularization(model, "fusion")
    torch.testing.assert_close(penalty, 0.5 * sum(((torch.eye(64) - v) ** 2).sum() for v in values))
    penalty.backward()
    assert all(v.grad is not None for v in values)
    with pytest.raises(ValueError, match="not an AdapterFusion adapter.*\\['fusion'\\]"):
        value_regularization(model, "a")


# -- Stack: AdapterHub's Stack("a", "b") is set_adapter(["a", "b"]) ---------------------------------------------
def test_stack_is_each_adapter_on_the_output_of_the_one_before():
    model = with_adapters("gpt2").eval()
    model.set_adapter(["a", "b"])
    with torch.no_grad():
        stacked = outputs(model, IDS)
    layers = {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, mp.core.TunerLayer)}
    reference = MODELS["gpt2"]()
    for name, layer in layers.items():
        a, b = layer.adapter["a"], layer.adapter["b"]
        reference.get_submodule(name).register_forward_hook(
            lambda m, args, h, a=a, b=b: (h + f(h, a)) + f(h + f(h, a), b)
        )
    with torch.no_grad():
        torch.testing.assert_close(stacked, outputs(reference, IDS), rtol=0, atol=1e-5)
    model.set_adapter(["b", "a"])
    with torch.no_grad():
        assert not torch.allclose(outputs(model, IDS), stacked, atol=1e-4), "the order of a stack matters"


def test_a_stacked_adapter_feeds_the_fusion():
    """set_adapter(["c", "ab"]) is AdapterHub's Stack("c", Fuse("a", "b")): the fusion reads c's output."""
    model = with_adapters("gpt2").eval()
    model.add_adapter("ab", FusionConfig(adapter_names=["a", "b"]))
    with torch.no_grad():
        for layer in sites(model).values():
            for p in layer.adapter_fusion["ab"].parameters():
                p.normal_(std=0.2)
    model.set_adapter(["c", "ab"])
    with torch.no_grad():
        out = outputs(model, IDS)

    def stack_then_fuse(h, layer):
        h = h + f(h, layer.base_layer.adapter["c"])
        fusion, z = layer.adapter_fusion["ab"], [f(h, layer.base_layer.adapter[n]) for n in ("a", "b")]
        s = torch.softmax(torch.stack([((h @ fusion.query.weight.T) * (zn @ fusion.key.weight.T)).sum(-1)
                                       for zn in z], -1), -1)  # fmt: skip
        return h + s[..., :1] * (z[0] @ fusion.value.weight.T) + s[..., 1:] * (z[1] @ fusion.value.weight.T)

    torch.testing.assert_close(out, by_hand(model, "gpt2", stack_then_fuse), rtol=0, atol=1e-5)


# -- bad input: a clear error, before anything changes --------------------------------------------------------
def snapshot(model: mp.PeftModel) -> tuple:
    modules = [(n, type(m).__name__) for n, m in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {k: p.requires_grad for k, p in model.named_parameters()}
    return modules, state, grads, dict(model.peft_config), list(model.active_adapters), outputs(model, IDS)


def assert_unchanged(model: mp.PeftModel, before: tuple) -> None:
    after = snapshot(model)
    assert after[0] == before[0] and after[2:5] == before[2:5]
    assert after[1].keys() == before[1].keys() and all(torch.equal(after[1][k], before[1][k]) for k in after[1])
    assert torch.equal(after[5], before[5])


@pytest.mark.parametrize("kind", KINDS)
def test_a_fusion_cannot_be_the_first_adapter(kind):
    base = MODELS[kind]()
    with pytest.raises(ValueError, match=r"no adapter named \['a', 'b', 'c'\].*Add or load the adapters to fuse"):
        mp.get_peft_model(base, CASES["ADAPTER_FUSION"].config(kind, True))
    assert not any(isinstance(m, mp.core.AdapterWrapper) for m in base.modules())


@pytest.mark.parametrize(
    "names,error,message",
    [
        (["a", "zzz"], ValueError, r"no adapter named \['zzz'\]; its serial adapters are \['a', 'b', 'c', 'h'\]"),
        (["a", "lora"], TypeError, r"serial bottleneck adapters.*'lora': \['LoraLayer'\]"),
        (["a", "par"], TypeError, r"'par': \['ParallelAdapterLayer'\]"),
        (["a", "fusion"], TypeError, r"'fusion': \['FusionLayer'\]"),
        (["a", "h"], ValueError, r"same modules.*'h': \['transformer.h.0.attn.c_proj'"),
    ],
)
def test_bad_adapters_to_fuse_are_refused_and_the_model_is_unchanged(names, error, message):
    model = fused()
    model.add_adapter("lora", mp.LoraConfig(r=2, target_modules=["c_attn"]))
    model.add_adapter("par", mp.ParallelAdapterConfig(bottleneck_size=4))
    model.add_adapter("h", mp.AdapterConfig(bottleneck_size=4, placement="houlsby"))
    before = snapshot(model)
    with pytest.raises(error, match=message):
        model.add_adapter("new", FusionConfig(adapter_names=names))
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(adapter_names=["a"]), "two or more distinct"),
        (dict(adapter_names=["a", "a"]), "two or more distinct"),
        (dict(adapter_names=["a", "b"], temperature=0.0), "temperature > 0"),
        (dict(adapter_names=["a", "b"], target_modules=["c_proj"]), "target_modules must be None"),
    ],
)
def test_bad_config_is_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        FusionConfig(**fields)


def test_deleting_a_fused_adapter_is_refused_while_the_fusion_exists():
    model = fused()
    model.set_adapter(["a", "fusion"])
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'a' is used by \['fusion'\].*delete \['fusion'\] first"):
        model.delete_adapter("a")
    assert_unchanged(model, before)
    model.delete_adapter("fusion")
    model.delete_adapter("a")
    assert sorted(model.peft_config) == ["b", "c"]
    assert not any(".adapter_fusion." in k or ".a." in k for k in model.state_dict())
