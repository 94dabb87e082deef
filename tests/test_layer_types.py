"""Every (method, layer type) pair HF peft supports, on a tiny plain-torch model holding an nn.Embedding,
an nn.Conv1d, an nn.Conv2d and an nn.Linear (core/layer_types.py): closed-form parameter counts,
merge/unmerge equivalence, exact disable, save/load round trip; the pairs peft does not support are
refused with an error that names the module, its type and the supported types, leaving the model as it was.
tests/test_layer_types_vs_peft.py compares the same pairs with peft itself."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import minipeft as mp
from minipeft.core import layer_types

VOCAB, T = 200, 12  # input ids (B, 12); the conv2d sees them as a (3, 4) image


class TinyConvNet(nn.Module):
    """ids (B, T) -> emb (B, T, w) -> conv1 (B, w, T) -> conv2 on (B, w, 3, 4) -> pooled (B, w) -> head (B, w + 2)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, width)
        self.conv1 = nn.Conv1d(width, width, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=(1, 2), padding=1)
        self.head = nn.Linear(width, width + 2)

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        h = self.emb(input_ids).transpose(1, 2)  # (B, w, T)
        h = torch.relu(self.conv1(h))  # (B, w, T)
        h = self.conv2(h.reshape(*h.shape[:2], 3, T // 3))  # (B, w, 3, 2)
        return SimpleNamespace(logits=self.head(h.mean(dim=(2, 3))))  # (B, w + 2)


IDS = torch.randint(0, VOCAB, (3, T), generator=torch.Generator().manual_seed(1))
LAYERS = ("emb", "conv1", "conv2", "head")
# The layer types peft 0.21 adapts with each method ("ia3_ff": (IA)^3 rescaling the input).
SUPPORTED = {
    "lora": LAYERS,
    "dora": LAYERS,
    "loha": ("conv1", "conv2", "head"),
    "loha_cp": ("conv1", "conv2", "head"),  # use_effective_conv2d: a core (r, r, *kernel) per factor
    "lokr": ("conv1", "conv2", "head"),  # r = 1: W2 as a product W2a W2b
    "lokr_full": ("conv1", "conv2", "head"),  # r = 2: W2 in full, (b, d, *kernel)
    "lokr_cp": ("conv1", "conv2", "head"),  # use_effective_conv2d: W2 from a core (r, r, *kernel)
    "ia3": ("conv2", "head"),
    "ia3_ff": ("conv2", "head"),
}
PAIRS = [(m, t) for m, types in SUPPORTED.items() for t in types]
UNSUPPORTED = [(m, t) for m, types in SUPPORTED.items() for t in LAYERS if t not in types]


def config(method: str, target: str | list[str], identity: bool = False) -> mp.PeftConfig:
    """A minipeft config of `method` on one module (or several); identity=False gives a non-zero update."""
    targets = [target] if isinstance(target, str) else list(target)
    if method in ("lora", "dora"):
        return mp.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=identity,
                             use_dora=method == "dora")  # fmt: skip
    cp = method.endswith("_cp")  # use_effective_conv2d
    if method.startswith("loha"):
        return mp.LoHaConfig(r=4, alpha=8, target_modules=targets, init_weights=identity, use_effective_conv2d=cp)
    if method.startswith("lokr"):
        r = 2 if method == "lokr_full" else 1
        return mp.LoKrConfig(r=r, alpha=2 * r, target_modules=targets, init_weights=identity, use_effective_conv2d=cp)
    feedforward = targets if method == "ia3_ff" else []
    return mp.IA3Config(target_modules=targets, feedforward_modules=feedforward, init_ia3_weights=identity)


def sqrt_pair(dim: int) -> tuple[int, int]:
    m = max(k for k in range(1, math.isqrt(dim) + 1) if dim % k == 0)
    return m, dim // m


def closed_form(method: str, base: nn.Module, cfg: mp.PeftConfig) -> int:
    """The chapters' counts, with a convolution's fan_in = in_channels * kernel size and an
    embedding seen as a (dim x num_embeddings) matrix; summed over the targets."""
    return sum(count(method, base.get_submodule(name), cfg) for name in cfg.target_modules)


def count(method: str, module: nn.Module, cfg: mp.PeftConfig) -> int:
    """Trainable numbers `method` adds to one module."""
    d_out, fan_in = layer_types.matrix_shape(module)
    d_in, _ = layer_types.features(module)
    k = math.prod(layer_types.kernel_size(module))
    if method == "lora":
        return cfg.r * (d_out + fan_in)  # A (r, fan_in), B (d_out, r)
    if method == "dora":
        return cfg.r * (d_out + fan_in) + d_out  # and one magnitude per output
    if method == "loha_cp" and k > 1:
        return 2 * (cfg.r * cfg.r * k + cfg.r * (d_out + d_in))  # per factor: a core and two thin matrices
    if method.startswith("loha"):
        return 2 * cfg.r * (d_out + fan_in)  # two LoRA-sized pairs
    if method.startswith("lokr"):  # W1 (a, c) in full; W2 (b, d * k), low-rank when r < max(b, d) / 2
        (a, b), (c, d) = sqrt_pair(d_out), sqrt_pair(d_in)
        if cfg.r >= max(b, d) / 2:
            return a * c + b * d * k
        if method == "lokr_cp" and k > 1:
            return a * c + cfg.r * cfg.r * k + cfg.r * (b + d)  # W2 from a core (r, r, *kernel)
        return a * c + cfg.r * (b + d * k)
    return d_in if method == "ia3_ff" else d_out  # one factor per input (output) feature


def build(method: str, target: str, identity: bool = False):
    base = TinyConvNet()
    return base, mp.get_peft_model(copy.deepcopy(base), config(method, target, identity))


@pytest.mark.parametrize("method,target", PAIRS)
def test_count_matches_closed_form(method, target):
    base, model = build(method, target, identity=True)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == closed_form(method, base, model.peft_config["default"])
    assert total == sum(p.numel() for p in base.parameters()) + trainable


@pytest.mark.parametrize("method,target", PAIRS)
def test_identity_at_init(method, target):
    base, model = build(method, target, identity=True)
    torch.testing.assert_close(model(input_ids=IDS).logits, base(IDS).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method,target", PAIRS)
def test_merge_unmerge_and_disable(method, target):
    base, model = build(method, target)
    expected, plain = model(input_ids=IDS).logits, base(IDS).logits
    assert not torch.allclose(expected, plain), "the test needs a non-trivial update"
    with model.disable_adapter():
        assert torch.equal(model(input_ids=IDS).logits, plain)
    model.merge_adapter()
    torch.testing.assert_close(model(input_ids=IDS).logits, expected, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(model(input_ids=IDS).logits, expected, rtol=0, atol=1e-5)
    merged = model.merge_and_unload()
    assert type(merged.get_submodule(target)) is type(base.get_submodule(target))
    torch.testing.assert_close(merged(IDS).logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method,target", PAIRS)
def test_gradients_reach_only_the_adapter(method, target):
    _, model = build(method, target)
    model(input_ids=IDS).logits.pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("method,target", PAIRS)
def test_save_load_round_trip(method, target, tmp_path):
    _, model = build(method, target)
    expected = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path)
    loaded = mp.PeftModel.from_pretrained(TinyConvNet(), tmp_path)
    torch.testing.assert_close(loaded(input_ids=IDS).logits, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="shape"):
        mp.PeftModel.from_pretrained(TinyConvNet(width=16), tmp_path)


@pytest.mark.parametrize("method,target", UNSUPPORTED)
def test_unsupported_pair_is_refused_and_changes_nothing(method, target):
    base = TinyConvNet()
    before_types = {n: type(m) for n, m in base.named_modules()}
    before_state = {k: v.clone() for k, v in base.state_dict().items()}
    cfg = config(method, target)
    cfg.target_modules = ["head", target]  # a supported target first: it must not stay wrapped either
    with pytest.raises(TypeError) as error:
        mp.get_peft_model(base, cfg)
    message = str(error.value)
    assert target in message and type(base.get_submodule(target)).__name__ in message
    assert "Linear" in message and "Conv2d" in message, "the message lists the supported types"
    assert {n: type(m) for n, m in base.named_modules()} == before_types
    after = base.state_dict()
    assert after.keys() == before_state.keys() and all(torch.equal(v, after[k]) for k, v in before_state.items())


def test_layer_types_round_trip_the_stored_weight():
    """weight_matrix and to_stored are inverse; apply_weight with W reproduces the base without its bias."""
    base = TinyConvNet()
    x = {"emb": IDS, "conv1": torch.randn(2, 8, T), "conv2": torch.randn(2, 8, 3, 4), "head": torch.randn(2, 8)}
    for name, inp in x.items():
        module = base.get_submodule(name)
        w = layer_types.weight_matrix(module)
        assert w.shape == layer_types.matrix_shape(module)
        assert torch.equal(layer_types.to_stored(module, w), module.weight)
        bias = getattr(module, "bias", None)
        out = module(inp) - (0 if bias is None else layer_types.per_feature(module, bias, module(inp).dim()))
        torch.testing.assert_close(layer_types.apply_weight(module, inp, w), out, rtol=0, atol=1e-6)


def test_rank_above_the_matrix_warns():
    with pytest.warns(UserWarning, match=r"r=9 exceeds min\(d_out, fan_in\) = min\(8, "):
        mp.get_peft_model(TinyConvNet(), mp.LoraConfig(r=9, target_modules=["emb"]))  # dim 8


@pytest.mark.parametrize("method", SUPPORTED)
def test_mixed_batch_on_every_layer_type(method):
    """One adapter per row (`adapter_names=`): each row as if its adapter alone were active."""
    targets = list(SUPPORTED[method])
    model = mp.get_peft_model(TinyConvNet(), config(method, targets)).eval()
    model.add_adapter("b", config(method, targets))
    first = model(input_ids=IDS).logits
    model.set_adapter("b")
    second = model(input_ids=IDS).logits
    with model.disable_adapter():
        plain = model(input_ids=IDS).logits
    mixed = model(input_ids=IDS, adapter_names=["default", "__base__", "b"]).logits
    torch.testing.assert_close(mixed, torch.stack([first[0], plain[1], second[2]]), rtol=0, atol=1e-5)
