"""The fused LoRA kernel (minipeft/kernels/lora_triton.py) against the plain-torch
reference, forward and backward, in Triton's CPU interpreter (tests/conftest.py turns it
on): odd shapes that are not multiples of the blocks, ranks 1-64, 2-D and 3-D inputs,
fp32, fp16 and bf16, with and without bias, and Conv1D's transposed weight."""

from __future__ import annotations

import pytest
import torch

import minipeft as mp
from minipeft import kernels
from minipeft.kernels import lora_triton, reference
from minipeft.kernels.lora_triton import fused_lora_linear
from minipeft.models import tiny_gpt2, tiny_llama
from minipeft.reparameterized import lora_kernels
from minipeft.reparameterized.lora import LoraLayer
from tests.cases import outputs

# (leading shape of x, d_in, d_out, r, dtype, bias, weight stored transposed like Conv1D, blocks or None = default)
SHAPES = [
    ((37,), 70, 45, 3, torch.float32, True, False, (16, 16, 32, 2)),  # 3 row tiles, 3 ragged column groups, 3 K steps
    ((2, 9), 33, 129, 64, torch.float16, True, True, None),  # 3-D, the largest rank, 2 column tiles in one group
    ((5, 1, 3), 20, 17, 1, torch.float32, False, False, None),  # 4-D, rank 1, no bias
    ((65,), 130, 67, 16, torch.float16, False, False, None),  # 2 row tiles, 2 K steps
    ((3, 7), 24, 40, 8, torch.bfloat16, True, True, (16, 16, 16, 1)),  # bf16: cast to fp32 in the interpreter
]
# Relative tolerance of each dtype against the fp32 reference (the inputs are rounded alike).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    scale = expected.float().abs().max().item() + 1e-6
    torch.testing.assert_close(actual.float(), expected.float(), rtol=0, atol=TOL[dtype] * scale)


def operands(lead, d_in, d_out, r, dtype, bias, transposed, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, std=1.0: (torch.randn(*shape, generator=g) * std).to(dtype)
    x = rand(*lead, d_in)
    weight = rand(d_in, d_out, std=d_in**-0.5).T if transposed else rand(d_out, d_in, std=d_in**-0.5)
    b = rand(d_out) if bias else None
    return x, weight, b, rand(r, d_in, std=d_in**-0.5), rand(d_out, r), rand(*lead, d_out)


@pytest.mark.parametrize("lead,d_in,d_out,r,dtype,bias,transposed,blocks", SHAPES)
def test_forward_and_backward_match_the_reference(lead, d_in, d_out, r, dtype, bias, transposed, blocks):
    x, weight, b, lora_a, lora_b, grad_y = operands(lead, d_in, d_out, r, dtype, bias, transposed)
    x.requires_grad_(), lora_a.requires_grad_(), lora_b.requires_grad_()
    y = fused_lora_linear(x, weight, b, lora_a, lora_b, scaling=1.5, blocks=blocks)
    assert y.shape == (*lead, d_out) and y.dtype == dtype
    close(y, reference.lora_linear(x, weight, b, lora_a, lora_b, 1.5), dtype)
    y.backward(grad_y)
    expected = reference.lora_linear_backward(x, weight, lora_a, lora_b, 1.5, grad_y)
    for got, want in zip((x.grad, lora_a.grad, lora_b.grad), expected, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        close(got, want, dtype)


def test_the_derived_backward_is_autograd_of_the_forward():
    x, weight, b, lora_a, lora_b, grad_y = operands((4, 6), 12, 10, 3, torch.float32, True, False)
    params = [t.requires_grad_() for t in (x, lora_a, lora_b)]
    reference.lora_linear(x, weight, b, lora_a, lora_b, 0.7).backward(grad_y)
    derived = reference.lora_linear_backward(x, weight, lora_a, lora_b, 0.7, grad_y)
    for p, d in zip(params, derived, strict=True):
        torch.testing.assert_close(p.grad, d)


def test_no_grad_forward_and_multi_tile_blocks():
    x, weight, b, lora_a, lora_b, _ = operands((50,), 40, 36, 5, torch.float32, True, False)
    with torch.no_grad():
        y = fused_lora_linear(x, weight, b, lora_a, lora_b, 2.0, blocks=(16, 16, 16, 2))  # 4 x 3 tiles, 3 K steps
    close(y, reference.lora_linear(x, weight, b, lora_a, lora_b, 2.0), torch.float32)


def test_bad_operands_are_refused():
    x, weight, b, lora_a, lora_b, _ = operands((5,), 12, 10, 3, torch.float32, True, False)
    with pytest.raises(ValueError, match=r"shapes do not fit.*lora_A \(3, 12\)"):
        fused_lora_linear(x, weight, b, lora_a, lora_b.T, 1.0)
    with pytest.raises(ValueError, match="one dtype"):
        fused_lora_linear(x.half(), weight, b, lora_a, lora_b, 1.0)
    with pytest.raises(ValueError, match="keeps the base weight and bias frozen"):
        fused_lora_linear(x, weight.requires_grad_(), b, lora_a, lora_b, 1.0)


@pytest.mark.parametrize("make,targets", [(tiny_gpt2, ["c_attn", "c_fc"]), (tiny_llama, ["q_proj", "down_proj"])])
def test_lora_layers_with_kernel_triton_match_kernel_torch(make, targets, monkeypatch):
    ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(3))
    calls = []
    monkeypatch.setattr(lora_triton, "fused_lora_linear", lambda *a: calls.append(1) or fused_lora_linear(*a))
    models = {}
    for kernel in ("torch", "triton"):
        torch.manual_seed(0)
        config = mp.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, kernel=kernel)
        models[kernel] = mp.get_peft_model(make(), config)
        outputs(models[kernel], ids).float().pow(2).mean().backward()
    assert len(calls) == 2 * len(targets), "every adapted layer of the 2-layer model must run through the kernel"
    torch.testing.assert_close(outputs(models["triton"], ids), outputs(models["torch"], ids), rtol=1e-4, atol=1e-5)
    grads = {k: {n: p.grad for n, p in m.named_parameters() if p.requires_grad} for k, m in models.items()}
    assert grads["torch"].keys() == grads["triton"].keys() and len(grads["torch"]) == 4 * len(targets)
    for name, grad in grads["torch"].items():
        torch.testing.assert_close(grads["triton"][name], grad, rtol=1e-4, atol=1e-6)


def test_auto_runs_torch_on_cpu_and_triton_needs_a_plain_lora():
    assert kernels.use_triton("auto", torch.zeros(1)) is False
    assert kernels.use_triton("torch", torch.zeros(1)) is False
    assert kernels.use_triton("triton", torch.zeros(1)) is True  # the interpreter is on in the tests
    with pytest.raises(ValueError, match="kernel='triton'.*lora_dropout=0"):
        mp.LoraConfig(kernel="triton", lora_dropout=0.1)
    with pytest.raises(TypeError, match="kernel"):
        mp.LoraConfig(kernel="cuda")


def test_missing_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(kernels, "triton_installed", lambda: False)
    assert kernels.use_triton("auto", torch.zeros(1)) is False
    with pytest.raises(RuntimeError, match=r"needs the triton package.*kernel='torch'"):
        kernels.use_triton("triton", torch.zeros(1))


def test_which_adapters_the_kernel_computes():
    layer = LoraLayer(torch.nn.Linear(12, 10))  # a bare layer: its base still trains
    layer.add_adapter("plain", mp.LoraConfig(r=2, kernel="auto"))
    layer.add_adapter("dora", mp.LoraConfig(r=2, use_dora=True))
    layer.add_adapter("drop", mp.LoraConfig(r=2, lora_dropout=0.1))
    layer.active_adapters = ["plain"]
    x = torch.zeros(3, 12)
    assert not lora_kernels._fusable(layer, "plain", x)  # "auto" leaves a trainable base to torch ...
    layer.kernel["plain"] = "triton"
    assert lora_kernels._fusable(layer, "plain", x)  # ... "triton" hands it to the kernel, which refuses it clearly
    with pytest.raises(ValueError, match="keeps the base weight and bias frozen"):
        layer(x)
    layer.base_layer.requires_grad_(False)
    assert lora_kernels._fusable(layer, "plain", x.double()) and not lora_kernels._fusable(layer, "dora", x)
    layer.kernel["plain"] = "auto"
    assert not lora_kernels._fusable(layer, "plain", x.double())  # mixed dtypes: torch under "auto"
    assert not lora_kernels._fusable(layer.train(), "drop", x) and lora_kernels._fusable(layer.eval(), "drop", x)
