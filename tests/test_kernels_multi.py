"""The gathered multi-LoRA kernel (minipeft/kernels/multi_lora.py) against the plain-torch
reference, forward and backward, in Triton's CPU interpreter: odd shapes, ranks 1-64,
2-D and 3-D inputs, fp32, fp16 and bf16, rows without an adapter, and its batch plan."""

from __future__ import annotations

import pytest
import torch

from minipeft.kernels import reference
from minipeft.kernels.multi_lora import Segments, multi_lora

# (leading shape of x, d_in, d_out, r, adapters, one adapter index per row, dtype, blocks or None = default)
SHAPES = [
    ((5, 7), 70, 45, 3, 3, [2, 0, -1, -1, 1], torch.float32, (16, 16, 32, 1)),  # 3-D, 35 tokens, every kind of row
    ((40,), 33, 129, 64, 2, [1] * 35 + [0] * 3 + [-1, 1], torch.float16, (16, 64, 16, 1)),  # segments of 3 tiles
    ((6, 3), 20, 17, 1, 4, [0, 2, 2, -1, -1, 0], torch.float32, None),  # rank 1, an adapter absent from the batch
    ((4, 5), 24, 40, 8, 5, [4, 3, 1, 4], torch.bfloat16, None),
    ((3, 2), 16, 16, 4, 2, [-1, -1, -1], torch.float32, None),  # no row has an adapter: the base comes back
]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def close(actual, expected, dtype):
    scale = expected.float().abs().max().item() + 1e-6
    torch.testing.assert_close(actual.float(), expected.float(), rtol=0, atol=TOL[dtype] * scale)


@pytest.mark.parametrize("lead,d_in,d_out,r,n_adapters,rows,dtype,blocks", SHAPES)
def test_forward_and_backward_match_the_reference(lead, d_in, d_out, r, n_adapters, rows, dtype, blocks):
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape, std=1.0: (torch.randn(*shape, generator=g) * std).to(dtype).requires_grad_()
    x, base = rand(*lead, d_in), rand(*lead, d_out)
    a_stack, b_stack = rand(n_adapters, r, d_in, std=d_in**-0.5), rand(n_adapters, d_out, r)
    scalings = torch.rand(n_adapters, generator=g) + 0.5
    indices, grad = torch.tensor(rows), torch.randn(*lead, d_out, generator=g).to(dtype)
    leaves = (x, base, a_stack, b_stack)

    y = multi_lora(x, indices, a_stack, b_stack, scalings, base, blocks)
    y.backward(grad)
    got = [t.grad for t in leaves]
    for t in leaves:
        t.grad = None
    expected = reference.multi_lora(x, indices, a_stack, b_stack, scalings, base)
    expected.backward(grad)
    assert y.shape == expected.shape and y.dtype == dtype
    close(y, expected, dtype)
    for t, grad_t in zip(leaves, got, strict=True):
        assert grad_t.dtype == t.dtype
        close(grad_t, t.grad, dtype)


def test_rows_alone_equal_rows_in_the_batch():
    g = torch.Generator().manual_seed(1)
    x, a_stack, b_stack = torch.randn(4, 3, 12, generator=g), torch.randn(3, 2, 12, generator=g), torch.randn(3, 9, 2)
    scalings, indices = torch.tensor([1.0, 0.5, 2.0]), torch.tensor([2, -1, 0, 2])
    batch = multi_lora(x, indices, a_stack, b_stack, scalings)
    for i in range(4):
        alone = multi_lora(x[i : i + 1], indices[i : i + 1], a_stack, b_stack, scalings)
        torch.testing.assert_close(batch[i : i + 1], alone, rtol=0, atol=1e-6)
    assert batch[1].abs().max() == 0  # no adapter, no base given: zero


def test_batch_plan_covers_every_adapted_token_once():
    token_indices = torch.tensor([3, -1, 0, 3, 3, 1, -1, 3, 0, 3, 3])
    plan = Segments.build(token_indices, block_m=2)
    assert sorted(plan.rows.tolist()) == [i for i, a in enumerate(token_indices.tolist()) if a >= 0]
    assert plan.seg_adapter.tolist() == [0, 1, 3] and plan.seg_start.tolist() == [0, 2, 3, 9]
    sizes = (plan.tile_end - plan.tile_start).tolist()
    assert sizes == [2, 1, 2, 2, 2] and plan.tile_adapter.tolist() == [0, 1, 3, 3, 3]
    for start, end, adapter in zip(plan.tile_start, plan.tile_end, plan.tile_adapter, strict=True):
        assert all(token_indices[plan.rows[start:end]] == adapter)


def test_bad_indices_are_refused():
    x, a_stack, b_stack, scalings = torch.randn(2, 8), torch.randn(3, 2, 8), torch.randn(3, 5, 2), torch.ones(3)
    with pytest.raises(ValueError, match=r"indices must lie in \[-1, 2\]"):
        multi_lora(x, torch.tensor([0, 3]), a_stack, b_stack, scalings)
    with pytest.raises(ValueError, match="one adapter index per row"):
        multi_lora(x, torch.tensor([0]), a_stack, b_stack, scalings)
    with pytest.raises(ValueError, match=r"shapes do not fit"):
        multi_lora(x, torch.tensor([0, 1]), a_stack, b_stack.transpose(1, 2), scalings)


def test_backward_leaves_the_callers_gradient_alone():
    x, base = torch.randn(3, 8, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    a_stack, b_stack, grad = torch.randn(2, 2, 8), torch.randn(2, 5, 2), torch.randn(3, 5)
    before = grad.clone()
    for _ in range(2):  # the second backward accumulates into base.grad: it must not be `grad` itself
        multi_lora(x, torch.tensor([1, -1, 0]), a_stack, b_stack, torch.ones(2), base).backward(grad)
    assert torch.equal(grad, before) and torch.equal(base.grad, 2 * before)
