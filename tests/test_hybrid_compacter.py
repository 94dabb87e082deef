"""Compacter and Compacter++ (Karimi Mahabadi et al., 2021), chapter 08, against a plain-torch re-implementation:
each PHM weight built by hand as a sum of torch.kron products, the adapters applied by forward hooks on a copy of
the base at sites named here from each architecture's module names. The slow weights are one tensor for the whole
model, and its gradient is the sum of what every layer sends it. The shared properties (training, disable,
save/load, counts) run in test_properties.py through tests/cases_hybrid_compacter.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import minipeft as mp
from minipeft.hybrid.compacter import CompacterConfig, PHMLinear
from tests.cases import MODELS, outputs
from tests.cases_hybrid_compacter import compacter_count

IDS = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
D, M, L = 64, 8, 2  # the tiny models' width and layers (minipeft.models), and the bottleneck used here
# Each block's (attention output, FFN output) projection, written from the architectures' module names.
SITES = {
    "gpt2": ("transformer.h.{}.attn.c_proj", "transformer.h.{}.mlp.c_proj"),
    "llama": ("model.layers.{}.self_attn.o_proj", "model.layers.{}.mlp.down_proj"),
    "bert": ("encoder.layer.{}.attention.output.dense", "encoder.layer.{}.output.dense"),
}


def sites(kind: str, placement: str) -> list[str]:
    chosen = SITES[kind] if placement == "houlsby" else SITES[kind][1:]
    return [s.format(i) for i in range(L) for s in chosen]


def config(**fields) -> CompacterConfig:
    """A visibly non-trivial Compacter (A ~ N(0, 0.5^2), the up projection not zeroed)."""
    return CompacterConfig(**{"bottleneck_size": M, "init_weights": False, "phm_init_range": 0.5, **fields})


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def phm_weight(a: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """W = sum_i A_i kron (s_i t_i^T), (d_out, d_in)."""
    return sum(torch.kron(a[i], s[i] @ t[i].T) for i in range(a.shape[0]))


def hand_built(base, model: mp.PeftModel, kind: str, placement: str, slow: dict | None = None):
    """A copy of `base` whose sites compute h + W_up gelu(W_down h + b_down) + b_up from the model's tensors.
    `slow` maps (site, "down"/"up") to the A to use there (default: the model's file tensors)."""
    tensors = model.adapter_state_dict()
    rules = {k: v for k, v in tensors.items() if k.endswith("phm_rule")}
    ref = copy.deepcopy(base)

    def hook(site):
        def add_adapter(module, args, h):
            def proj(p, x):
                key = f"base_model.model.{site}.adapter.{p}"
                a = slow[site, p] if slow else rules.get(f"{key}.phm_rule", next(iter(rules.values())))
                w = phm_weight(a, tensors[f"{key}.s"], tensors[f"{key}.t"])
                return x @ w.T + tensors[f"{key}.bias"]

            return h + proj("up", gelu_tanh(proj("down", h)))

        return add_adapter

    for site in sites(kind, placement):
        ref.get_submodule(site).register_forward_hook(hook(site))
    return ref


def test_defaults_are_the_papers():
    c = CompacterConfig()
    assert (c.phm_dim, c.phm_rank, c.shared_phm_rule, c.reduction_factor) == (4, 1, True, 32)
    assert (c.placement, c.non_linearity, c.phm_init_range) == ("houlsby", "gelu_new", 1e-4)
    assert CompacterConfig(placement="pfeiffer").sites() == ("ffn_out",)  # Compacter++


@pytest.mark.parametrize("kind", sorted(SITES))
@pytest.mark.parametrize(
    "fields", [dict(), dict(placement="pfeiffer", phm_rank=2), dict(shared_phm_rule=False, phm_dim=2)]
)
def test_equals_plain_torch(kind, fields):
    base = MODELS[kind]()
    model = mp.get_peft_model(copy.deepcopy(base), config(**fields))
    ref = hand_built(base, model, kind, model.peft_config["default"].placement)
    expected = outputs(ref, IDS)
    assert not torch.allclose(expected, outputs(base, IDS), atol=1e-3), "test needs a non-trivial adapter"
    torch.testing.assert_close(outputs(model, IDS), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(SITES))
def test_the_slow_weights_are_one_tensor_that_every_layer_trains(kind):
    base = MODELS[kind]()
    model = mp.get_peft_model(copy.deepcopy(base), config())
    phms = [m for m in model.modules() if isinstance(m, PHMLinear)]
    rule = phms[0].slow["A"]
    assert len(phms) == 2 * len(sites(kind, "houlsby")) and all(p.slow["A"] is rule for p in phms)
    assert len({p.slow["A"].data_ptr() for p in phms}) == 1, "one storage"
    assert [p for p in model.parameters() if p.shape == (4, 4, 4)] == [rule], "registered (trained, saved) once"
    assert [k for k in model.adapter_state_dict() if "phm_rule" in k] == [
        f"base_model.model.{sites(kind, 'houlsby')[0]}.adapter.down.phm_rule"
    ]
    # The reference gives every PHM layer its own copy of A: the shared tensor's gradient is their sum.
    copies = {(s, p): rule.detach().clone().requires_grad_() for s in sites(kind, "houlsby") for p in ("down", "up")}
    ref = hand_built(base, model, kind, "houlsby", slow=copies)
    outputs(model, IDS).pow(2).mean().backward()
    outputs(ref, IDS).pow(2).mean().backward()
    assert all(c.grad.abs().sum() > 0 for c in copies.values()), "every layer sends A a gradient"
    torch.testing.assert_close(rule.grad, sum(c.grad for c in copies.values()), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", sorted(SITES))
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_compacter_after_attention_and_ffn_compacter_pp_after_the_ffn_only(kind, placement):
    model = mp.get_peft_model(MODELS[kind](), config(placement=placement))
    held = [n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, PHMLinear)]
    assert sorted({n.rsplit(".adapter.", 1)[0] for n in held}) == sorted(sites(kind, placement))


@pytest.mark.parametrize("kind", sorted(SITES))
def test_counts_are_the_papers_and_far_below_a_plain_adapter(kind):
    base = MODELS[kind]()

    def trainable(cfg) -> int:
        return mp.get_peft_model(copy.deepcopy(base), cfg).get_nb_trainable_parameters()[0]

    compacter, plusplus = trainable(config()), trainable(config(placement="pfeiffer"))
    n = 4
    biases = 2 * L * (D + M)  # b_down (m) and b_up (d) per site, which the paper's count leaves out
    assert compacter - biases == 4 * L * (D + M) + n**3  # the paper's 4 L (d + m) + n^3, r = 1
    assert plusplus == (compacter - n**3) // 2 + n**3  # one site per block instead of two, the same A
    assert compacter == compacter_count(base, config())
    for fields in (dict(phm_rank=2), dict(shared_phm_rule=False), dict(phm_dim=2, placement="pfeiffer")):
        assert trainable(config(**fields)) == compacter_count(base, config(**fields)), fields
    plain = trainable(mp.AdapterConfig(bottleneck_size=M, placement="houlsby"))
    assert plain == 2 * L * (2 * D * M + D + M) and compacter < plain / 4


def test_round_trip_keeps_one_shared_tensor(tmp_path):
    model = mp.get_peft_model(MODELS["gpt2"](), config())
    expected = outputs(model, IDS)
    model.save_pretrained(tmp_path)
    saved = mp.core.io.load_adapter_files(tmp_path)[1]
    assert [k for k in saved if "phm_rule" in k] == [
        "base_model.model.transformer.h.0.attn.c_proj.adapter.down.phm_rule"
    ]
    loaded = mp.PeftModel.from_pretrained(MODELS["gpt2"](), tmp_path)
    phms = [m for m in loaded.modules() if isinstance(m, PHMLinear)]
    assert all(p.slow["A"] is phms[0].slow["A"] for p in phms), "loading fills the one shared tensor"
    torch.testing.assert_close(outputs(loaded, IDS), expected, rtol=0, atol=0)


def test_identity_at_init_exact_by_default_and_near_with_the_released_init():
    base = MODELS["gpt2"]()
    plain = outputs(base, IDS)
    exact = mp.get_peft_model(copy.deepcopy(base), CompacterConfig(bottleneck_size=M))
    assert torch.equal(outputs(exact, IDS), plain)
    up = exact.base_model.model.transformer.h[0].mlp.c_proj.adapter["default"].up
    assert not up.t.any() and up.s.abs().max() <= math.sqrt(12 / (D // 4 + 1)), "only t of the up projection is 0"
    released = mp.get_peft_model(copy.deepcopy(base), CompacterConfig(bottleneck_size=M, init_weights=False))
    h = torch.randn(16, D, generator=torch.Generator().manual_seed(0))
    f = released.base_model.model.transformer.h[0].mlp.c_proj.adapter["default"](h)  # (16, d)
    ratio = (f.norm(dim=-1) / h.norm(dim=-1)).max()
    assert 0 < ratio < 1e-6, f"the released code's init is near, not at, the identity: |f(h)| / |h| = {ratio}"


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(phm_rank=0), r"phm_rank must be a positive integer \(1 in the paper\), got 0"),
        (dict(phm_rank=-2), "phm_rank must be a positive integer"),
        (dict(phm_dim=0), r"phm_dim must be a positive integer \(4 in the paper\), got 0"),
        (dict(bottleneck_size=6), r"bottleneck_size=6 is not a multiple of phm_dim=4.*e\.g\. 8"),
        (dict(phm_init_range=0.0), "phm_init_range must be > 0"),
        (dict(phm_dim=2.0), "phm_dim must be <class 'int'>"),
    ],
)
def test_bad_config_refused_at_construction(fields, message):
    with pytest.raises((ValueError, TypeError), match=message):
        CompacterConfig(**fields)


def snapshot(model: torch.nn.Module) -> tuple:
    return {n: type(m) for n, m in model.named_modules()}, {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: torch.nn.Module, before: tuple) -> None:
    modules, state = snapshot(model)
    assert modules == before[0], "a refused call leaves every module as it was"
    assert state.keys() == before[1].keys() and all(torch.equal(v, state[k]) for k, v in before[1].items())


@pytest.mark.parametrize(
    "fields,message",
    [  # the tiny models: d = 64 at every site
        (dict(phm_dim=3, bottleneck_size=9), r"phm_dim=3 does not divide the width d=64 of module '.*c_proj'"),
        (dict(bottleneck_size=None), r"phm_dim=4 does not divide the bottleneck m=2 of .*reduction_factor among"),
        (dict(phm_rank=3), r"phm_rank=3 exceeds min\(m, d\) / n = 2.*phm_rank <= 2"),
    ],
)
def test_bad_sizes_refused_with_the_model_unchanged(fields, message):
    base = MODELS["gpt2"]()
    before = snapshot(base)
    with pytest.raises(ValueError, match=message):
        mp.get_peft_model(base, config(**fields))
    assert_unchanged(base, before)
    model = mp.get_peft_model(base, config())
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        model.add_adapter("other", config(**fields))
    assert_unchanged(model, before)
    assert sorted(model.peft_config) == ["default"]
