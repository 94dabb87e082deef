"""An analytic cost model of LoRA layers: FLOPs and memory traffic per kernel launch, and
the roofline time they imply (Williams et al., 2009). Chapter 10 uses it to show why an
unfused LoRA layer costs more than its FLOPs say, chapter 11 to estimate serving
throughput on a GPU, and benchmarks/bench_kernels.py prints it next to measured times.

Each kernel reads and writes every operand once (compulsory traffic, perfect caching);
its time is max(FLOPs / peak, bytes / bandwidth) plus a fixed launch overhead. Shapes:
M tokens, K = d_in, N = d_out, r the rank, `e` bytes per element.
"""

from __future__ import annotations

from dataclasses import dataclass

# Dense fp16/bf16 tensor-core peak (FLOP/s), memory bandwidth (B/s), from the vendors' data sheets.
GPUS = {"T4 (Colab)": (65e12, 320e9), "A100 40GB": (312e12, 1555e9), "H100 SXM": (989e12, 3350e9)}
LAUNCH = 4e-6  # seconds per kernel launch, a typical CUDA figure


@dataclass
class Kernel:
    name: str
    flops: float
    bytes: float

    def seconds(self, peak: float, bandwidth: float) -> float:
        return max(self.flops / peak, self.bytes / bandwidth) + LAUNCH


def _lora_only(m: float, k: int, n: int, r: int, e: int) -> list[Kernel]:
    """Eager LoRA on top of a computed base output: two thin matmuls, the scaling, the sum."""
    return [
        Kernel("x A^T", 2 * m * k * r, e * (m * k + r * k + m * r)),
        Kernel("(xA^T) B^T", 2 * m * r * n, e * (m * r + n * r + m * n)),
        Kernel("* s", m * n, 2 * e * m * n),
        Kernel("+ result", m * n, 3 * e * m * n),
    ]


def lora_kernels(
    m: int, k: int, n: int, r: int, path: str, backward: bool = False, e: int = 2, recompute: int = 1
) -> list[Kernel]:
    """The launches of one LoRA linear layer, forward (or backward, base frozen), for
    path "base" (the base matmul alone, = a merged adapter), "eager" (minipeft's torch path:
    base, x A^T, (x A^T) B^T, times s, plus the result) or "fused" (the Triton kernel, whose
    `recompute` column groups of programs each compute x A^T for their rows)."""
    if path not in ("base", "eager", "fused"):
        raise ValueError(f"path must be 'base', 'eager' or 'fused', got {path!r}")
    if not backward:
        base = Kernel("x W^T + b", 2 * m * k * n, e * (m * k + k * n + m * n + n))
        fused = Kernel("fused", base.flops + 2 * m * r * (recompute * k + n), base.bytes + e * r * (k + n))
        return {"base": [base], "fused": [fused], "eager": [base, *_lora_only(m, k, n, r, e)]}[path]
    base = Kernel("dx = g W", 2 * m * n * k, e * (m * n + n * k + m * k))
    grads = [
        Kernel("dA = s (gB)^T x", 2 * m * r * k, e * (m * r + m * k + r * k)),
        Kernel("dB = s g^T (xA)", 2 * m * n * r, e * (m * n + m * r + n * r)),
    ]
    fused = Kernel("dx = gW + s(gB)A", base.flops + 2 * m * r * (recompute * n + k), base.bytes + e * r * (n + k))
    eager = [
        Kernel("* s backward", m * n, 2 * e * m * n),
        Kernel("g B", 2 * m * n * r, e * (m * n + n * r + m * r)),
        Kernel("(gB) A", 2 * m * r * k, e * (m * r + r * k + m * k)),
        Kernel("dx sum", m * k, 3 * e * m * k),
    ]
    return {"base": [base], "fused": [fused, *grads], "eager": [base, *eager, *grads]}[path]


def multi_lora_kernels(m: int, k: int, n: int, r: int, adapters: int, path: str, e: int = 2) -> list[Kernel]:
    """The LoRA part of a mixed batch of M tokens over `adapters` distinct adapters (the base
    matmul is shared and not counted): "loop" runs the eager LoRA on each adapter's rows
    (gather, two matmuls, scale, scatter-add: HF peft's way), "gathered" is one SGMV launch."""
    if path == "gathered":
        traffic = e * (m * k + adapters * r * (k + n) + 2 * m * n)  # x, each adapter once, out read + written
        return [Kernel("SGMV", 2 * m * r * (k + n), traffic)]
    if path != "loop":
        raise ValueError(f"path must be 'loop' or 'gathered', got {path!r}")
    rows = m / adapters
    return [
        kern
        for _ in range(adapters)
        for kern in [Kernel("gather x", 0, 2 * e * rows * k), *_lora_only(rows, k, n, r, e)]
    ]


def merge_kernels(k: int, n: int, r: int, e: int = 2) -> list[Kernel]:
    """Merging one adapter into W (W += s B A) and unmerging it again: what switching adapters costs."""
    fold = Kernel("W +/- s B A", 2 * n * k * r + n * k, e * (2 * n * k + r * (n + k)))
    return [fold, fold]


def roofline_seconds(kernels: list[Kernel], gpu: str = "A100 40GB") -> float:
    """Estimated time of a sequence of launches on one of `GPUS`."""
    peak, bandwidth = GPUS[gpu]
    return sum(kern.seconds(peak, bandwidth) for kern in kernels)
