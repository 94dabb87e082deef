"""The kernels against their plain-torch references, forward and backward, as a table:
the correctness check that chapters 10 and 11 and benchmarks/bench_kernels.py print
(on a CPU it runs in Triton's interpreter). tests/test_kernels_*.py check more cases.
"""

from __future__ import annotations

import torch

from . import reference

# (leading shape of x, d_in, d_out, r): odd sizes, not multiples of any block.
SHAPES = [((37,), 70, 45, 3), ((2, 9), 33, 129, 16), ((5,), 20, 17, 1), ((3, 4), 48, 40, 64)]


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest error relative to the largest reference value."""
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12)).item()


def _named(errors: list[float]) -> dict[str, float]:
    return dict(zip(["y", "dx", "dA", "dB"], errors, strict=True))


def _rand(*shape, dtype, device, std=1.0, gen=None) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dtype).requires_grad_()


def check_fused(shapes=SHAPES, dtypes=(torch.float32, torch.float16), device: str = "cpu") -> list[dict]:
    """One row per (shape, dtype): relative errors of y, dx, dA, dB of `fused_lora_linear`."""
    from .lora_triton import fused_lora_linear

    rows, gen = [], torch.Generator().manual_seed(0)
    for (lead, k, n, r), dtype in ((s, d) for s in shapes for d in dtypes):
        x, a = _rand(*lead, k, dtype=dtype, device=device, gen=gen), _rand(r, k, dtype=dtype, device=device, gen=gen)
        b, g = _rand(n, r, dtype=dtype, device=device, gen=gen), _rand(*lead, n, dtype=dtype, device=device, gen=gen)
        w = _rand(n, k, dtype=dtype, device=device, std=k**-0.5, gen=gen).detach()
        y = fused_lora_linear(x, w, None, a, b, 2.0)
        y.backward(g)
        want = [reference.lora_linear(x, w, None, a, b, 2.0), *reference.lora_linear_backward(x, w, a, b, 2.0, g)]
        errors = [_rel(got, ref) for got, ref in zip([y, x.grad, a.grad, b.grad], want, strict=True)]
        rows.append({"x": tuple(x.shape), "W": (n, k), "r": r, "dtype": str(dtype)[6:], **_named(errors)})
    return rows


def check_multi(shapes=SHAPES, dtypes=(torch.float32, torch.float16), adapters: int = 3, device: str = "cpu"):
    """One row per (shape, dtype): relative errors of `multi_lora` with a random adapter (or none) per row."""
    from .multi_lora import multi_lora

    rows, gen = [], torch.Generator().manual_seed(1)
    for (lead, k, n, r), dtype in ((s, d) for s in shapes for d in dtypes):
        x = _rand(*lead, k, dtype=dtype, device=device, gen=gen)
        base = _rand(*lead, n, dtype=dtype, device=device, gen=gen)
        a = _rand(adapters, r, k, dtype=dtype, device=device, std=k**-0.5, gen=gen)
        b, g = _rand(adapters, n, r, dtype=dtype, device=device, gen=gen), torch.randn(*lead, n, generator=gen)
        idx = torch.randint(-1, adapters, lead[:1], generator=gen).to(device)
        s = torch.linspace(0.5, 2.0, adapters, device=device)
        leaves = [x, a, b]
        multi_lora(x, idx, a, b, s, base).backward(g.to(device, dtype))
        got = [t.grad for t in leaves]
        for t in leaves:
            t.grad = None
        want = reference.multi_lora(x, idx, a, b, s, base)
        want.backward(g.to(device, dtype))
        y = multi_lora(x, idx, a, b, s, base)
        errors = [_rel(y, want)] + [_rel(gt, t.grad) for gt, t in zip(got, leaves, strict=True)]
        rows.append({"x": tuple(x.shape), "adapters": idx.tolist(), "r": r, "dtype": str(dtype)[6:], **_named(errors)})
    return rows
