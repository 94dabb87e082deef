"""The analytic cost model (minipeft/kernels/cost.py) of chapters 10 and 11: its matmul
FLOPs equal what torch's FlopCounterMode counts on the real eager LoRA layer, forward and
backward, and its traffic differences equal the closed forms written in chapter 10."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import minipeft as mp
from minipeft.kernels.cost import lora_kernels, merge_kernels, multi_lora_kernels, roofline_seconds
from minipeft.reparameterized.lora import LoraLayer

ELEMENTWISE = {"* s", "+ result", "* s backward", "dx sum"}  # FlopCounterMode counts matmuls only


@pytest.mark.parametrize("m,k,n,r", [(24, 40, 56, 4), (10, 33, 17, 1)])
def test_matmul_flops_match_torch_flop_counter(m, k, n, r):
    layer = LoraLayer(nn.Linear(k, n).requires_grad_(False))
    layer.add_adapter("default", mp.LoraConfig(r=r, kernel="torch"))
    x = torch.randn(2, m // 2, k, requires_grad=True)
    with FlopCounterMode(display=False) as forward:
        y = layer(x)
    with FlopCounterMode(display=False) as backward:
        y.sum().backward()
    for counter, is_backward in ((forward, False), (backward, True)):
        kernels = lora_kernels(m, k, n, r, "eager", backward=is_backward)
        assert sum(kern.flops for kern in kernels if kern.name not in ELEMENTWISE) == counter.get_total_flops()
        fused = lora_kernels(m, k, n, r, "fused", backward=is_backward)
        assert sum(kern.flops for kern in fused) == counter.get_total_flops()  # same maths, one pass


def test_traffic_closed_forms():
    m, k, n, r, e = 512, 4096, 4096, 16, 2
    nbytes = lambda path, backward=False: sum(kern.bytes for kern in lora_kernels(m, k, n, r, path, backward, e))
    assert nbytes("eager") - nbytes("fused") == e * (m * k + 2 * m * r + 6 * m * n)
    assert nbytes("fused") - nbytes("base") == e * r * (k + n)
    assert nbytes("base") == e * (m * k + k * n + m * n + n)
    assert len(lora_kernels(m, k, n, r, "eager")) == 5 and len(lora_kernels(m, k, n, r, "fused")) == 1
    # Compute-bound forward: the fused layer costs the base matmul plus about r / d_out, eager much more.
    time = {p: roofline_seconds(lora_kernels(8192, k, n, r, p)) for p in ("base", "eager", "fused")}
    assert time["fused"] / time["base"] < 1.01 and time["eager"] / time["fused"] > 1.2


def test_mixed_batch_model():
    one, many = (multi_lora_kernels(64, 4096, 4096, 16, a, "loop") for a in (1, 32))
    assert len(many) == 32 * len(one) and sum(k.flops for k in many) == pytest.approx(sum(k.flops for k in one))
    # With 1024 tokens, reading 32 adapters instead of one costs < 1.5x; the loop pays 32 launches.
    gathered = [roofline_seconds(multi_lora_kernels(1024, 4096, 4096, 16, a, "gathered")) for a in (1, 32)]
    looped = roofline_seconds(multi_lora_kernels(1024, 4096, 4096, 16, 32, "loop"))
    assert gathered[1] < 1.5 * gathered[0] and 3 * gathered[1] < looped
    # Switching a merged adapter reads and writes W twice: more than a small batch's whole matmul.
    assert sum(k.bytes for k in merge_kernels(4096, 4096, 16)) == 2 * 2 * (2 * 4096 * 4096 + 16 * 8192)
    assert roofline_seconds(merge_kernels(4096, 4096, 16)) > roofline_seconds(lora_kernels(32, 4096, 4096, 16, "base"))
    with pytest.raises(ValueError, match="path must be"):
        lora_kernels(1, 1, 1, 1, "merged")
