"""The Triton LoRA kernels on LLaMA-7B-shaped layers, side by side in one run (chapters 10, 11).

On a CUDA GPU, for d_in x d_out in {4096 x 4096, 4096 x 11008}, tokens 512-8192, r 8-64:
  fused Triton LoRA | eager LoRA (minipeft's torch path) | base matmul alone | merged adapter,
forward and forward+backward: median time, achieved TFLOP/s and GB/s (FLOPs and compulsory
bytes from minipeft.kernels.cost), and the ratios the kernels aim at:
  eager / fused        target >= 1.2
  fused / base         target <= 1.1
Then the mixed-batch (SGMV) kernel: 8-32 distinct adapters / one adapter, target <= 1.5.

Without a GPU the timings mean nothing: the script says so, runs the correctness check in
Triton's CPU interpreter, and prints the roofline estimates instead.
Usage: python benchmarks/bench_kernels.py [--dtype float16|bfloat16] [--quick]
"""

from __future__ import annotations

import argparse
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined

import pandas as pd
from torch import nn

import minipeft as mp
from minipeft.kernels import cost
from minipeft.reparameterized.lora import LoraLayer

SHAPES = [(4096, 4096), (4096, 11008)]  # LLaMA-7B: attention projections, MLP up/gate


def cpu_report() -> None:
    from minipeft.kernels.check import check_fused, check_multi

    print("No CUDA GPU: kernel timings need a GPU (on a CPU Triton only interprets). Running the")
    print("interpreter correctness check instead: largest error relative to the reference's largest value.\n")
    pd.set_option("display.width", 160)
    print("fused LoRA kernel vs reference.lora_linear (+ its backward):")
    print(pd.DataFrame(check_fused()).to_string(index=False, float_format="{:.1e}".format))
    print("\nmixed-batch kernel vs reference.multi_lora (3 adapters, -1 = none):")
    print(pd.DataFrame(check_multi()).drop(columns="adapters").to_string(index=False, float_format="{:.1e}".format))
    print("\nRoofline ESTIMATES (not measurements), fp16, A100 40GB, r=16, from minipeft.kernels.cost:")
    rows = []
    for k, n in SHAPES:
        for m in (512, 2048, 8192):
            t = {p: cost.roofline_seconds(cost.lora_kernels(m, k, n, 16, p)) for p in ("base", "eager", "fused")}
            rows.append({"layer": f"{k}x{n}", "tokens": m, **{f"{p} us": v * 1e6 for p, v in t.items()},
                         "eager/fused": t["eager"] / t["fused"], "fused/base": t["fused"] / t["base"]})  # fmt: skip
    print(pd.DataFrame(rows).to_string(index=False, float_format="{:.2f}".format))


def time_layer(k: int, n: int, m: int, r: int, dtype: torch.dtype) -> list[dict]:
    """Rows of (path, pass): median seconds, TFLOP/s and GB/s of one LoRA layer of shape (k -> n), m tokens."""
    from triton.testing import do_bench

    layer = LoraLayer(nn.Linear(k, n, bias=False, device="cuda", dtype=dtype).requires_grad_(False))
    layer.add_adapter("default", mp.LoraConfig(r=r, init_lora_weights=False, kernel="torch"))
    merged = nn.Linear(k, n, bias=False, device="cuda", dtype=dtype).requires_grad_(False)
    merged.weight.data = layer.weight.data + layer.delta_weight("default").detach().to(dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype, requires_grad=True)
    modules = {"base": layer.base_layer, "merged": merged, "eager": layer, "fused": layer}
    rows = []
    for backward in (False, True):
        for path, module in modules.items():
            layer.kernel["default"] = "triton" if path == "fused" else "torch"
            step = (lambda mod=module: mod(x).sum().backward()) if backward else (lambda mod=module: mod(x))
            with torch.set_grad_enabled(backward):
                seconds = do_bench(step) * 1e-3
            kind = "base" if path == "merged" else path
            kernels = cost.lora_kernels(m, k, n, r, kind, e=x.element_size())
            kernels += cost.lora_kernels(m, k, n, r, kind, backward=True, e=x.element_size()) if backward else []
            flops, nbytes = sum(q.flops for q in kernels), sum(q.bytes for q in kernels)
            rows.append({"layer": f"{k}x{n}", "tokens": m, "r": r, "pass": "fwd+bwd" if backward else "fwd",
                         "path": path, "ms": seconds * 1e3, "TFLOP/s": flops / seconds / 1e12,
                         "GB/s": nbytes / seconds / 1e9})  # fmt: skip
    return rows


def time_mixed(m: int, adapters: int, dtype: torch.dtype, k: int = 4096, n: int = 4096, r: int = 16) -> float:
    """Median seconds of one mixed-batch SGMV call: m tokens spread over `adapters` adapters."""
    from triton.testing import do_bench

    from minipeft.kernels.multi_lora import multi_lora

    x, base = torch.randn(m, k, device="cuda", dtype=dtype), torch.randn(m, n, device="cuda", dtype=dtype)
    a = torch.randn(adapters, r, k, device="cuda", dtype=dtype) / k**0.5
    b = torch.randn(adapters, n, r, device="cuda", dtype=dtype)
    idx, s = torch.arange(m, device="cuda") % adapters, torch.ones(adapters, device="cuda")
    with torch.no_grad():
        return do_bench(lambda: multi_lora(x, idx, a, b, s, base)) * 1e-3


def gpu_report(dtype: torch.dtype, quick: bool) -> None:
    print(f"GPU: {torch.cuda.get_device_name()} | {dtype} | medians of triton.testing.do_bench\n")
    rows = []
    for k, n in SHAPES:
        for m in (512, 8192) if quick else (512, 2048, 8192):
            for r in (16,) if quick else (8, 16, 64):
                rows += time_layer(k, n, m, r, dtype)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format="{:.2f}".format))
    ms = table.pivot_table(index=["layer", "tokens", "r", "pass"], columns="path", values="ms")
    ratios = pd.DataFrame({"eager/fused (>= 1.2)": ms.eager / ms.fused, "fused/base (<= 1.1)": ms.fused / ms.base})
    print("\n" + ratios.to_string(float_format="{:.2f}".format))
    print("\nmixed batch: SGMV time with L distinct adapters / with one adapter (target <= 1.5)")
    for m in (64, 1024, 4096):
        t = {adapters: time_mixed(m, adapters, dtype) for adapters in (1, 8, 16, 32)}
        ratios = " | ".join(f"L={adapters}: {t[adapters] / t[1]:.2f}x" for adapters in (8, 16, 32))
        print(f"  tokens {m:5d}: one adapter {t[1] * 1e6:.0f} us | {ratios}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    args = ap.parse_args()
    if torch.cuda.is_available():
        gpu_report(getattr(torch, args.dtype), args.quick)
    else:
        cpu_report()


if __name__ == "__main__":
    main()
