"""Merging LoRA adapters (`add_weighted_adapter`, minipeft/hybrid/merging.py) against HF peft on the same
adapters and arguments, the merged adapter as a normal adapter (saves, loads in peft, merges), bad input,
and LoraHub's search (minipeft/hybrid/lorahub.py) on a toy task whose answer is known."""

from __future__ import annotations

import re

import numpy as np
import peft
import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model_state_dict

import minipeft as mp
from minipeft.hybrid import COMBINATION_TYPES
from minipeft.hybrid.lorahub import cma_es, compose
from minipeft.hybrid.merging import drop, write_adapter
from minipeft.models import tiny_gpt2
from minipeft.reparameterized.lora import LoraLayer
from tests.cases import outputs

IDS = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(3))
NAMES = ["a", "b", "c"]
WEIGHTS = [0.7, -0.4, 1.2]  # a negative weight subtracts
# Equal ranks (every type), overlapping targets, different scalings; "c" alone on the feed-forward.
SAME_RANK = {
    "a": dict(r=4, lora_alpha=8, target_modules=["c_attn"]),
    "b": dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"]),
    "c": dict(r=4, lora_alpha=4, target_modules=["c_fc"]),
}
# Different ranks: only cat and the svd types.
MIXED_RANK = {
    "a": dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"]),
    "b": dict(r=8, lora_alpha=8, target_modules=["c_attn"]),
    "c": dict(r=4, lora_alpha=16, target_modules=["c_fc", "c_proj"], use_rslora=True),
}
# The token embedding (factors stored (r, vocab) and (dim, r), the update transposed to the stored weight).
EMBEDDING = {
    "a": dict(r=4, lora_alpha=8, target_modules=["wte", "c_attn"]),
    "b": dict(r=4, lora_alpha=16, target_modules=["wte"]),
    "c": dict(r=4, lora_alpha=4, target_modules=["c_fc"]),
}
DENSITY = {t: 0.5 for t in COMBINATION_TYPES if t not in ("linear", "cat", "svd")}
SEED = 11
RULES_ON_FACTORS = ("linear", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # bit-equal to peft


def save_all(folder, settings: dict) -> None:
    for i, (name, s) in enumerate(settings.items()):
        torch.manual_seed(i)
        mp.get_peft_model(tiny_gpt2(), mp.LoraConfig(init_lora_weights=False, **s)).save_pretrained(folder / name)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folders = {}
    for kind, settings in (("same", SAME_RANK), ("mixed", MIXED_RANK), ("embedding", EMBEDDING)):
        folders[kind] = tmp_path_factory.mktemp(kind)
        save_all(folders[kind], settings)
    return folders


def load(lib, folder):
    """The three adapters, with identical weights, in minipeft (lib=mp) or peft."""
    model = lib.PeftModel.from_pretrained(tiny_gpt2(), folder / "a", adapter_name="a")
    for name in NAMES[1:]:
        model.load_adapter(folder / name, name)
    return model


def peft_merge(theirs, *args, **kwargs) -> None:
    """peft's add_weighted_adapter, with torch's global generator seeded right after it injected the new
    adapter (its parameter init draws from it): DARE's masks are then drawn from the same state as ours."""
    inject = theirs.base_model.inject_adapter

    def inject_then_seed(*a, **k):
        out = inject(*a, **k)
        torch.manual_seed(SEED)
        return out

    theirs.base_model.inject_adapter = inject_then_seed
    try:
        theirs.add_weighted_adapter(*args, **kwargs)
    finally:
        del theirs.base_model.inject_adapter


def merged_pair(saved, kind: str, combination_type: str, **options):
    ours, theirs = load(mp, saved[kind]), load(peft, saved[kind])
    torch.manual_seed(SEED)
    ours.add_weighted_adapter(NAMES, WEIGHTS, "m", combination_type=combination_type, **options)
    peft_merge(theirs, NAMES, WEIGHTS, "m", combination_type=combination_type, **options)
    return ours, theirs


def tensors(model, name: str = "m") -> dict[str, torch.Tensor]:
    if isinstance(model, mp.PeftModel):
        return {k.replace(f".{name}.", "."): v.detach() for k, v in model.adapter_state_dict(name).items()}
    return get_peft_model_state_dict(model, adapter_name=name)


def deltas(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{module: B A} (scaling 1): what a factorisation that is unique only up to signs determines."""
    return {k: state[k.replace("lora_A", "lora_B").replace("embedding_A", "embedding_B")] @ v
            for k, v in state.items() if "lora_A" in k or "embedding_A" in k}  # fmt: skip


def run(model, name: str = "m") -> torch.Tensor:
    model.set_adapter(name)
    with torch.no_grad():
        return outputs(model.eval(), IDS)


def cases():
    """(adapters, combination type, options) of every comparison with peft."""
    for t in COMBINATION_TYPES:
        yield pytest.param("same", t, {"density": DENSITY.get(t)}, id=f"same-rank-{t}")
    for t in ("cat", "svd", "ties_svd", "dare_ties_svd"):
        yield pytest.param("mixed", t, {"density": DENSITY.get(t)}, id=f"mixed-rank-{t}")
    for t in ("linear", "cat", "svd", "dare_ties", "ties_svd", "dare_linear_svd"):
        yield pytest.param("embedding", t, {"density": DENSITY.get(t)}, id=f"embedding-{t}")
    frequency = {"density": 0.3, "majority_sign_method": "frequency"}
    yield pytest.param("same", "ties", frequency, id="ties-frequency")
    yield pytest.param("same", "dare_ties_svd", frequency, id="dare_ties_svd-frequency")
    yield pytest.param("mixed", "svd", {"svd_rank": 3, "svd_clamp": 0.9}, id="svd-rank-clamp")
    yield pytest.param("mixed", "magnitude_prune_svd", {"density": 0.2, "svd_rank": 6}, id="magnitude_prune_svd-rank")


@pytest.mark.parametrize("kind,combination_type,options", list(cases()))
def test_same_adapter_as_peft(saved, kind, combination_type, options):
    ours, theirs = merged_pair(saved, kind, combination_type, **options)
    mine, peft_side = tensors(ours), tensors(theirs)
    assert mine.keys() == peft_side.keys()
    assert ours.peft_config["m"].r == theirs.peft_config["m"].r
    assert ours.peft_config["m"].scaling == 1.0
    if combination_type.endswith("svd"):  # singular vectors are unique up to sign: compare B A
        for key, delta in deltas(peft_side).items():
            torch.testing.assert_close(deltas(mine)[key], delta, rtol=0, atol=1e-6)
    else:
        for key, value in peft_side.items():
            torch.testing.assert_close(mine[key], value, rtol=0, atol=0)
    torch.testing.assert_close(run(ours), run(theirs), rtol=0, atol=1e-5)


@pytest.mark.parametrize("combination_type", ["cat", "svd", "ties", "dare_linear"])
def test_merged_adapter_saves_loads_in_peft_and_merges(saved, combination_type, tmp_path):
    ours, _ = merged_pair(saved, "same", combination_type, density=DENSITY.get(combination_type))
    expected = run(ours)
    ours.save_pretrained(tmp_path, selected_adapters=["m"])
    in_peft = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "m")
    torch.testing.assert_close(run(in_peft, "default"), expected, rtol=0, atol=1e-5)
    in_ours = mp.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "m")
    torch.testing.assert_close(run(in_ours, "default"), expected, rtol=0, atol=0)
    ours.merge_adapter(["m"])
    torch.testing.assert_close(run(ours), expected, rtol=0, atol=1e-5)


def target(name: str) -> str:
    """The module a layer adapts: a LoRA layer inside other wrappers sits at <name>.base_layer(.base_layer)."""
    return re.sub(r"(\.base_layer)+$", "", name)


def weighted_deltas(model, names, weights) -> dict[str, torch.Tensor]:
    """sum_i w_i s_i B_i A_i per module, from the source adapters."""
    out = {}
    for name, layer in model.base_model.model.named_modules():
        for n, w in zip(names, weights, strict=True):
            if isinstance(layer, LoraLayer) and n in layer.adapter_names():
                key = target(name)
                out[key] = out.get(key, 0) + w * layer.delta_weight(n).detach()
    return out


def merged_delta(model) -> dict[str, torch.Tensor]:
    return {target(name): layer.delta_weight("m").detach()
            for name, layer in model.base_model.model.named_modules()
            if isinstance(layer, LoraLayer) and "m" in layer.adapter_names()}  # fmt: skip


@pytest.mark.parametrize("combination_type,options", [("cat", {}), ("svd", {"svd_rank": 14})])
def test_cat_and_full_rank_svd_are_the_weighted_sum_of_updates(saved, combination_type, options):
    """cat stacks the ranks: exact. svd with a rank >= the sum of ranks drops nothing: exact too."""
    model = load(mp, saved["mixed"])
    model.add_weighted_adapter(NAMES, WEIGHTS, "m", combination_type=combination_type, **options)
    expected = weighted_deltas(model, NAMES, WEIGHTS)
    assert merged_delta(model).keys() == expected.keys()
    for name, delta in merged_delta(model).items():
        torch.testing.assert_close(delta, expected[name], rtol=0, atol=1e-5)


def test_rslora_first_adapter_gives_scaling_one(saved):
    """The new adapter's factors carry every scaling, so it never uses rsLoRA. (peft copies use_rslora from
    the first adapter and then scales by sqrt(r): its update is sqrt(r) times too large there.)"""
    model = load(mp, saved["mixed"])
    model.add_weighted_adapter(["c"], [1.0], "m", combination_type="linear")
    assert model.peft_config["m"].use_rslora is False and model.peft_config["m"].scaling == 1.0
    expected = weighted_deltas(model, ["c"], [1.0])
    for name, delta in merged_delta(model).items():
        torch.testing.assert_close(delta, expected[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("options", [dict(combination_type="ties", density=0.3), dict(svd_rank=2)])
def test_one_adapter_is_combined_linearly(saved, options):
    """As in peft, a single adapter goes the linear way, at its own rank: w s B A exactly, whatever the
    type asked (its options are still checked)."""
    model = load(mp, saved["same"])
    model.add_weighted_adapter(["b"], [-0.5], "m", **options)
    assert model.peft_config["m"].r == 4
    expected = weighted_deltas(model, ["b"], [-0.5])
    for name, delta in merged_delta(model).items():
        torch.testing.assert_close(delta, expected[name], rtol=1e-6, atol=1e-6)


def test_dare_drop_keeps_the_expected_value():
    """DARE rescales what it keeps by 1/density: averaged over draws, the tensor comes back."""
    torch.manual_seed(0)
    tensor = torch.randn(64, 64)
    mean = torch.stack([drop(tensor, 0.3) for _ in range(2000)]).mean(0)
    assert (mean - tensor).abs().mean() < 0.05 * tensor.abs().mean()
    kept = (drop(tensor, 0.3) != 0).float().mean()
    assert abs(kept - 0.3) < 0.03
    assert torch.equal(drop(tensor, 1.0), tensor)


def test_unequal_target_kinds_combine_on_the_union(saved):
    """peft refuses a list mixed with a regex; here the new adapter targets the exact modules instead."""
    model = load(mp, saved["same"])
    model.add_adapter("x", mp.LoraConfig(r=4, target_modules=r".*\.1\.mlp\.c_proj", init_lora_weights=False))
    model.add_weighted_adapter(["a", "x"], [1.0, 1.0], "m", combination_type="linear")
    names = set(merged_delta(model))
    assert names == {f"transformer.h.{i}.attn.c_attn" for i in (0, 1)} | {"transformer.h.1.mlp.c_proj"}


def test_lora_inside_another_methods_wrapper(saved):
    """A LoRA layer wrapped by (IA)^3 still combines; the new adapter goes on the same module."""
    model = load(mp, saved["same"])
    model.add_adapter("ia3", mp.IA3Config(target_modules=["c_attn"], feedforward_modules=[]))
    model.add_weighted_adapter(NAMES, WEIGHTS, "m", combination_type="cat")
    expected = weighted_deltas(model, NAMES, WEIGHTS)
    assert merged_delta(model).keys() == expected.keys()
    for name, delta in merged_delta(model).items():
        torch.testing.assert_close(delta, expected[name], rtol=0, atol=1e-5)


def bad_inputs():
    d = dict(adapters=NAMES, weights=WEIGHTS, adapter_name="m")
    yield dict(d, adapters=["a", "nope"]), "no adapter named 'nope'"
    yield dict(d, adapters=["a", "a"]), "distinct"
    yield dict(d, adapters=[]), "adapters"
    yield dict(d, weights=[1.0, 2.0]), "one weight per adapter"
    yield dict(d, weights=[1.0, float("nan"), 1.0]), "finite"
    yield dict(d, adapter_name="a"), "exists already"
    yield dict(d, adapter_name="m.n"), "adapter name"
    yield dict(d, combination_type="mean"), "combination_type must be one of"
    yield dict(d, combination_type="ties"), "density in (0, 1]"
    yield dict(d, combination_type="dare_linear", density=0.0), "density in (0, 1]"
    yield dict(d, combination_type="ties", density=1.5), "density in (0, 1]"
    yield dict(d, combination_type="linear", density=0.5), "density applies"
    yield dict(d, combination_type="ties", density=0.5, majority_sign_method="max"), "majority_sign_method"
    yield dict(d, combination_type="svd", svd_rank=65), "exceeds min(d_out, fan_in) = 64"
    yield dict(d, combination_type="svd", svd_rank=0), "svd_rank must be a positive integer"
    yield dict(d, combination_type="linear", svd_rank=2), "svd_rank and svd_clamp apply"
    yield dict(d, adapters=["a", "r2"], weights=[1, 1], combination_type="linear"), "same r"
    yield dict(d, adapters=["a", "dora"], weights=[1, 1]), "DoRA"
    yield dict(d, adapters=["a", "saves"], weights=[1, 1]), "modules_to_save"
    yield dict(d, adapters=["a", "loha"], weights=[1, 1]), "combines adapters of one method"
    yield dict(d, adapters=["loha"], weights=[1]), "combines adapters of one method among ['LORA']"


@pytest.mark.parametrize("kwargs,message", list(bad_inputs()), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_is_refused_and_changes_nothing(saved, kwargs, message):
    model = load(mp, saved["same"])
    model.add_adapter("r2", mp.LoraConfig(r=2, target_modules=["c_attn"]))
    model.add_adapter("dora", mp.LoraConfig(r=4, target_modules=["c_attn"], use_dora=True))
    model.add_adapter("saves", mp.LoraConfig(r=4, target_modules=["c_attn"], modules_to_save=["ln_f"]))
    model.add_adapter("loha", mp.LoHaConfig(r=4, target_modules=["c_attn"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    configs, active = dict(model.peft_config), list(model.active_adapters)
    with pytest.raises(ValueError, match=re.escape(message)):
        model.add_weighted_adapter(**kwargs)
    assert model.peft_config == configs and model.active_adapters == active
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


# -- LoraHub ---------------------------------------------------------------------------------------------


def test_cma_es_finds_a_minimum_in_the_box():
    target = np.array([0.9, -0.3, 1.4])
    best, value, history = cma_es(lambda x: float(((x - target) ** 2).sum()), np.zeros(3), 0.5, 300, 1.5, seed=1)
    assert value < 1e-3 and np.abs(best - target).max() < 0.03
    assert len(history) == 300 and history == sorted(history, reverse=True)
    _, clipped, _ = cma_es(lambda x: float((x[0] - 3.0) ** 2), np.zeros(1), 0.5, 100, 1.5)
    assert clipped == pytest.approx((1.5 - 3.0) ** 2)  # the optimum outside: the bound


@pytest.fixture(scope="module")
def hub():
    """Three random LoRA adapters, and a task that is adapter "b"'s: match the next-token distributions
    of the model with "b" (KL per sequence). The best composition is known: w = (0, 1, 0), loss 0."""
    torch.manual_seed(0)
    settings = dict(r=4, lora_alpha=32, target_modules=["c_attn", "c_fc"], init_lora_weights=False)
    model = mp.get_peft_model(tiny_gpt2(), mp.LoraConfig(**settings), adapter_name="a")
    for name in ("b", "c"):
        model.add_adapter(name, mp.LoraConfig(**settings))
    model.eval()
    ids = torch.randint(3, 200, (4, 12), generator=torch.Generator().manual_seed(1))
    model.set_adapter("b")
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.set_adapter("a")

    def kl_to_b(m) -> float:
        log_p = m(input_ids=ids).logits.log_softmax(-1)
        return float(F.kl_div(log_p, logits.log_softmax(-1), log_target=True, reduction="batchmean"))

    labels = torch.cat([ids[:, :1], logits.argmax(-1)[:, :-1]], dim=1)  # b's predictions; the loss shifts by one
    return model, kl_to_b, dict(input_ids=ids, labels=labels)


def loss_with(model, weights, loss_fn) -> float:
    """The loss of the LoraHub composition with `weights`, in a temporary adapter."""
    config = mp.LoraConfig(r=4, lora_alpha=4, target_modules=["c_attn", "c_fc"])  # scaling 1, as compose() wants
    write_adapter(model, "probe", config, compose(model, NAMES, weights))
    model.set_adapter("probe")
    with torch.no_grad():
        loss = loss_fn(model)
    model.set_adapter("a")
    model.delete_adapter("probe")
    return loss


def test_lorahub_puts_the_weight_on_the_adapter_of_the_task(hub):
    model, kl_to_b, _ = hub
    assert loss_with(model, [0, 1, 0], kl_to_b) == pytest.approx(0, abs=1e-6)
    result = mp.lorahub(model, NAMES, loss_fn=kl_to_b, budget=40, seed=0)
    weights = np.array(result.weights)
    assert np.argmax(np.abs(weights)) == 1 and 0.7 < weights[1] < 1.3
    assert np.abs(weights[[0, 2]]).max() < 0.3
    assert result.loss == pytest.approx(result.task_loss + 0.05 * np.abs(weights).mean())
    assert len(result.history) == 40 and result.history[-1] == result.loss
    assert result.task_loss < loss_with(model, [1 / 3] * 3, kl_to_b) / 4  # uniform weights
    assert model.active_adapters == ["a"] and not model.training
    model.delete_adapter("lorahub")


def test_lorahub_on_examples_leaves_a_normal_adapter(hub, tmp_path):
    """With labelled examples the loss is the model's own; the adapter left behind has that loss, saves,
    and loads in peft."""
    model, _, examples = hub
    result = mp.lorahub(model, NAMES, examples, adapter_name="hub", budget=8)
    model.set_adapter("hub")
    with torch.no_grad():
        assert float(model(**examples).loss) == pytest.approx(result.task_loss, abs=1e-6)
    expected = run(model, "hub")
    model.save_pretrained(tmp_path, selected_adapters=["hub"])
    in_peft = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "hub")
    torch.testing.assert_close(run(in_peft, "default"), expected, rtol=0, atol=1e-5)
    model.set_adapter("a")
    model.delete_adapter("hub")


def test_lorahub_bad_input_changes_nothing(hub):
    model, _, examples = hub
    configs = dict(model.peft_config)
    with pytest.raises(ValueError, match="either examples"):
        mp.lorahub(model, NAMES)
    with pytest.raises(ValueError, match="no adapter named 'z'"):
        mp.lorahub(model, ["a", "z"], examples)
    with pytest.raises(ValueError, match="budget"):
        mp.lorahub(model, NAMES, examples, budget=0)

    def failing(_model):
        raise RuntimeError("the loss failed")

    with pytest.raises(RuntimeError, match="the loss failed"):
        mp.lorahub(model, NAMES, loss_fn=failing)
    assert model.peft_config == configs and model.active_adapters == ["a"]


# -- convolutions ------------------------------------------------------------------------------------------


def conv_pair(lib, targets: list[str]):
    """Two LoRA adapters with random factors on the tiny conv net of test_layer_types."""
    from tests.test_layer_types import TinyConvNet

    torch.manual_seed(5)
    settings = dict(r=2, init_lora_weights=False)
    model = lib.get_peft_model(TinyConvNet(), lib.LoraConfig(lora_alpha=4, target_modules=targets, **settings), "a")
    model.add_adapter("b", lib.LoraConfig(lora_alpha=2, target_modules=targets[1:], **settings))
    return model


@pytest.mark.parametrize(
    "combination_type,targets",
    [
        ("linear", ["conv1", "conv2", "head", "emb"]),
        ("cat", ["conv1", "conv2", "head", "emb"]),
        ("dare_ties", ["conv1", "conv2", "head"]),
        ("svd", ["conv2", "head", "emb"]),  # peft's svd takes a Conv1d's update as a batch of matrices
        ("ties_svd", ["conv2", "head"]),
    ],
)
def test_convolutions_as_peft(combination_type, targets):
    from tests.test_layer_types import IDS as CONV_IDS

    ours, theirs = conv_pair(mp, targets), conv_pair(peft, targets)
    theirs.load_state_dict(ours.state_dict())  # the same factors in both
    options = {"density": 0.5} if combination_type in DENSITY else {}
    torch.manual_seed(SEED)
    ours.add_weighted_adapter(["a", "b"], [0.8, -1.1], "m", combination_type=combination_type, **options)
    peft_merge(theirs, ["a", "b"], [0.8, -1.1], "m", combination_type=combination_type, **options)
    mine, peft_side = tensors(ours), tensors(theirs)
    assert mine.keys() == peft_side.keys()
    for key, value in peft_side.items():
        torch.testing.assert_close(mine[key], value, rtol=0, atol=0 if combination_type in RULES_ON_FACTORS else 1e-6)
    ours.set_adapter("m")
    theirs.set_adapter("m")
    with torch.no_grad():
        torch.testing.assert_close(
            ours(input_ids=CONV_IDS).logits, theirs(input_ids=CONV_IDS).logits, rtol=0, atol=1e-5
        )


def test_svd_of_a_conv1d_update():
    """The update of a Conv1d as its (out, in * k) matrix: svd at full rank gives it back exactly."""
    model = conv_pair(mp, ["conv1", "conv1"])
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "m", combination_type="svd", svd_rank=4)
    expected = weighted_deltas(model, ["a", "b"], [1.0, 1.0])
    for name, delta in merged_delta(model).items():
        torch.testing.assert_close(delta, expected[name], rtol=0, atol=1e-5)
