"""A fused LoRA linear layer in Triton (Tillet et al., 2019), forward and backward.
Taught in chapter 10; LoRA itself is Hu et al., 2022, arXiv:2106.09685.

    y = x W^T + b + s (x A^T) B^T          x (M, K), W (N, K), A (r, K), B (N, r)

Eager PyTorch runs three matmuls and writes x A^T (M, r) to memory between them, and
reads x twice. `_lora_kernel` computes a (BLOCK_M, BLOCK_N) tile of y in one pass over
K: each loaded tile of x feeds both x W^T and x A^T, and x A^T stays in registers for
the second product. The same kernel computes dx = g W + s (g B) A in the backward,
with other strides. The weight gradients dA = s (g B)^T x and dB = s g^T (x A^T) are
sums over rows, done by `_outer_kernel` (shared with the mixed-batch kernel of
chapter 11). W and b are frozen: the base model does not train under LoRA.

Products accumulate in fp32. Under TRITON_INTERPRET=1 (CPU tensors) every tile is cast
to fp32 first, because the interpreter's bf16 arithmetic is wrong. Importing this module
needs triton; `minipeft.kernels` imports it only when a kernel runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import default_blocks, fp32_dot, launch, rank_block


@triton.jit
def _lora_kernel(
    X, P, Q, R, BIAS, OUT, MID,  # pointers
    M, N, K, RANK, scaling,  # sizes and the LoRA scaling
    s_xm, s_xk, s_pk, s_pn, s_qk, s_qr, s_rr, s_rn, s_om, s_on, s_mm, s_mr,  # strides
    HAS_BIAS: tl.constexpr, STORE_MID: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_N: tl.constexpr,
):  # fmt: skip
    """OUT = X P (+ BIAS) + scaling (X Q) R for BLOCK_M rows and GROUP_N tiles of BLOCK_N columns.
    X Q is computed with the first tile's products and kept in registers for the others; STORE_MID
    also writes it, once, for the backward. X (M, K), P (K, N), Q (K, RANK), R (RANK, N)."""
    pid_m, pid_g = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # rows of this program
    rr = tl.arange(0, BLOCK_R)  # the rank, padded to a power of two
    low = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)  # X Q
    for j in tl.static_range(GROUP_N):  # unrolled: j is known when compiling
        rn = (pid_g * GROUP_N + j) * BLOCK_N + tl.arange(0, BLOCK_N)  # columns of this tile
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # X P
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            in_k = rk < K
            x = tl.load(X + rm[:, None] * s_xm + rk[None, :] * s_xk, mask=(rm[:, None] < M) & in_k[None, :], other=0.0)
            p = tl.load(P + rk[:, None] * s_pk + rn[None, :] * s_pn, mask=in_k[:, None] & (rn[None, :] < N), other=0.0)
            if FP32_DOT:
                x, p = x.to(tl.float32), p.to(tl.float32)
            acc = tl.dot(x, p, acc, input_precision="ieee")  # (BLOCK_M, BLOCK_N) += x (BLOCK_M, BLOCK_K) @ p
            if j == 0:  # the same x tile, loaded once, also feeds the low-rank product
                q_mask = in_k[:, None] & (rr[None, :] < RANK)
                q = tl.load(Q + rk[:, None] * s_qk + rr[None, :] * s_qr, mask=q_mask, other=0.0)
                low = tl.dot(x, q.to(x.dtype), low, input_precision="ieee")  # (BLOCK_M, BLOCK_R)
        if j == 0 and STORE_MID:
            if pid_g == 0:  # the first column of programs saves X Q for the backward
                mid_mask = (rm[:, None] < M) & (rr[None, :] < RANK)
                tl.store(MID + rm[:, None] * s_mm + rr[None, :] * s_mr, low, mask=mid_mask)
        r_mask = (rr[:, None] < RANK) & (rn[None, :] < N)
        r = tl.load(R + rr[:, None] * s_rr + rn[None, :] * s_rn, mask=r_mask, other=0.0)
        if FP32_DOT:
            r = r.to(tl.float32)
        acc = tl.dot((low * scaling).to(r.dtype), r, acc, input_precision="ieee")  # += s (X Q) R
        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(OUT + rm[:, None] * s_om + rn[None, :] * s_on, acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _outer_kernel(
    U, V, OUT, ROWS, SEG_START, SEG_ID, SCALE,  # pointers
    P, Q,  # OUT is (segments, P, Q)
    s_um, s_up, s_vm, s_vq, s_ol, s_op, s_oq,  # strides
    GATHER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):  # fmt: skip
    """OUT[l] = SCALE[l] U[rows]^T V[rows], summed over the rows of segment g (l = SEG_ID[g]).
    Rows SEG_START[g] .. SEG_START[g+1], read through ROWS when GATHER. U (M, P), V (M, Q)."""
    g, pid_p, pid_q = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, end = tl.load(SEG_START + g), tl.load(SEG_START + g + 1)
    seg = tl.load(SEG_ID + g)
    rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    rq = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        i = m0 + tl.arange(0, BLOCK_M)
        valid = i < end
        rows = tl.load(ROWS + i, mask=valid, other=0) if GATHER else i
        u = tl.load(U + rows[:, None] * s_um + rp[None, :] * s_up, mask=valid[:, None] & (rp[None, :] < P), other=0.0)
        v = tl.load(V + rows[:, None] * s_vm + rq[None, :] * s_vq, mask=valid[:, None] & (rq[None, :] < Q), other=0.0)
        acc = tl.dot(tl.trans(u.to(tl.float32)), v.to(tl.float32), acc, input_precision="ieee")  # (BLOCK_P, BLOCK_Q)
    acc *= tl.load(SCALE + seg)
    out_mask = (rp[:, None] < P) & (rq[None, :] < Q)
    tl.store(OUT + seg * s_ol + rp[:, None] * s_op + rq[None, :] * s_oq, acc, mask=out_mask)


def lora_mm(x, p, q, r, scaling, bias=None, store_mid=False, blocks=None):
    """Launch `_lora_kernel`: (x p + bias + s (x q) r, x q or None), x (M, K), p (K, N), q (K, rank), r (rank, N)."""
    (m, k), n, rank = x.shape, p.shape[1], q.shape[1]
    bm, bn, bk, group = blocks or default_blocks(x, m, n)
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)  # (M, N)
    mid = torch.empty(m, rank, device=x.device, dtype=torch.float32) if store_mid else out  # (M, rank)
    grid = (triton.cdiv(m, bm), triton.cdiv(triton.cdiv(n, bn), group))
    launch(
        _lora_kernel, grid, x, p, q, r, bias if bias is not None else out, out, mid,
        m, n, k, rank, float(scaling),
        *x.stride(), *p.stride(), *q.stride(), *r.stride(), *out.stride(), *mid.stride(),
        HAS_BIAS=bias is not None, STORE_MID=store_mid, FP32_DOT=fp32_dot(x),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=rank_block(rank), GROUP_N=group,
    )  # fmt: skip
    return out, (mid if store_mid else None)


def segment_outer(u, v, out, seg_start, seg_id, scales, rows=None) -> torch.Tensor:
    """out[seg_id[g]] = scales[seg_id[g]] * u[rows_g]^T v[rows_g] for each segment g; u (M, P), v (M, Q)."""
    p, q = u.shape[1], v.shape[1]
    block_m, cap = (32, 64) if u.is_cuda else (128, 128)  # rows per step, largest output tile side
    bp, bq = min(rank_block(p), cap), min(rank_block(q), cap)
    grid = (seg_id.numel(), triton.cdiv(p, bp), triton.cdiv(q, bq))
    if not grid[0]:
        return out
    launch(
        _outer_kernel, grid, u, v, out, rows if rows is not None else seg_start, seg_start, seg_id, scales, p, q,
        *u.stride(), *v.stride(), *out.stride(),
        GATHER=rows is not None, BLOCK_M=block_m, BLOCK_P=bp, BLOCK_Q=bq,
    )  # fmt: skip
    return out


class FusedLoRA(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T with gradients for x, A and B (W and b frozen)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, blocks):
        x2 = x.reshape(-1, x.shape[-1])  # (M, K)
        needs_grad = any(ctx.needs_input_grad[i] for i in (0, 3, 4))
        y, xa = lora_mm(x2, weight.T, lora_a.T, lora_b.T, scaling, bias, store_mid=needs_grad, blocks=blocks)
        ctx.save_for_backward(x2, weight, lora_a, lora_b, xa)
        ctx.scaling, ctx.blocks, ctx.x_shape = scaling, blocks, x.shape
        return y.reshape(*x.shape[:-1], weight.shape[0])  # (..., N)

    @staticmethod
    def backward(ctx, grad_y):
        x2, weight, lora_a, lora_b, xa = ctx.saved_tensors
        g = grad_y.reshape(-1, weight.shape[0])  # (M, N)
        s = ctx.scaling
        dx, gb = lora_mm(g, weight, lora_b, lora_a, s, store_mid=True, blocks=ctx.blocks)  # g W + s (g B) A, g B
        one = torch.tensor([0, g.shape[0]], device=g.device, dtype=torch.int32)  # a single segment: all rows
        seg, scale = one[:1], torch.tensor([s], device=g.device, dtype=torch.float32)
        grad_a = segment_outer(gb, x2, torch.empty(1, *lora_a.shape, device=g.device), one, seg, scale)  # s (gB)^T x
        grad_b = segment_outer(g, xa, torch.empty(1, *lora_b.shape, device=g.device), one, seg, scale)  # s g^T (xA)
        dx = dx.reshape(ctx.x_shape) if ctx.needs_input_grad[0] else None
        return dx, None, None, grad_a[0].to(lora_a.dtype), grad_b[0].to(lora_b.dtype), None, None


def fused_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    blocks: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """The fused kernel as a differentiable function; weight (N, K) in nn.Linear layout (a transposed view is fine).
    `blocks` = (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_N) overrides `default_blocks` (powers of two, >= 16 on a GPU)."""
    n, k = weight.shape
    rank = lora_a.shape[0]
    if x.shape[-1] != k or lora_a.shape != (rank, k) or lora_b.shape != (n, rank):
        raise ValueError(
            f"fused LoRA shapes do not fit: x (..., {x.shape[-1]}), weight {tuple(weight.shape)} = (d_out, d_in), "
            f"lora_A {tuple(lora_a.shape)} = (r, d_in), lora_B {tuple(lora_b.shape)} = (d_out, r)"
        )
    dtypes = {t.dtype for t in (x, weight, lora_a, lora_b)}
    if len(dtypes) > 1:
        raise ValueError(f"fused LoRA needs x, weight, lora_A and lora_B in one dtype, got {sorted(map(str, dtypes))}")
    frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
    if torch.is_grad_enabled() and not frozen:
        raise ValueError(
            "the fused LoRA kernel keeps the base weight and bias frozen, but one of them requires grad; "
            "freeze it (get_peft_model does) or use LoraConfig(kernel='torch')"
        )
    return FusedLoRA.apply(x, weight, bias, lora_a, lora_b, scaling, blocks)
