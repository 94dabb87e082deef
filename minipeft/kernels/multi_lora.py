"""Many LoRA adapters in one batch: a gathered (segmented) LoRA kernel in Triton.
Taught in chapter 11. The idea is Punica's SGMV (Chen et al., 2023, arXiv:2310.18547),
also used by S-LoRA (Sheng et al., 2023, arXiv:2311.03285).

Row i of the batch uses adapter l = indices[i] (-1: the base model alone):

    y_i = base_i + s_l (x_i A_l^T) B_l^T       A stacked (L, r, K), B stacked (L, N, r)

The host sorts the tokens by adapter into segments and cuts each segment into tiles of
BLOCK_M rows; a Triton program takes one tile, reads its rows through the sort order
(nothing is copied) and multiplies them by that tile's adapter only. So a batch with
many adapters costs about what one adapter costs: the base matmul is shared, and each
token still does exactly one low-rank product. Adapters of different ranks are padded
to the largest rank with zeros. The backward (dx, dA_l, dB_l) reuses the same kernel
and the segmented weight-gradient kernel of `lora_triton`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .launch import default_blocks, fp32_dot, launch, rank_block
from .lora_triton import segment_outer


@triton.jit
def _sgmv_kernel(
    X, F, S, OUT, MID, ROWS, TILE_START, TILE_END, TILE_ADAPTER, SCALE,  # pointers
    K, N, RANK,  # X (M, K), F_l (RANK, K), S_l (N, RANK), OUT (M, N)
    s_xm, s_xk, s_fl, s_fr, s_fk, s_sl, s_sn, s_sr, s_om, s_on, s_mm, s_mr,  # strides
    STORE_MID: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """OUT[rows] += SCALE[l] (X[rows] F_l^T) S_l^T for the rows of tile t, which all use adapter l."""
    t, pid_n = tl.program_id(0), tl.program_id(1)
    start, end = tl.load(TILE_START + t), tl.load(TILE_END + t)
    ad = tl.load(TILE_ADAPTER + t)
    i = start + tl.arange(0, BLOCK_M)
    valid = i < end
    rows = tl.load(ROWS + i, mask=valid, other=0)  # gathered rows of X and OUT
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    low = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)  # X[rows] F_l^T
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + rows[:, None] * s_xm + rk[None, :] * s_xk, mask=valid[:, None] & (rk[None, :] < K), other=0.0)
        f_ptr = F + ad * s_fl + rk[:, None] * s_fk + rr[None, :] * s_fr
        f = tl.load(f_ptr, mask=(rk[:, None] < K) & (rr[None, :] < RANK), other=0.0)  # F_l^T tile (BLOCK_K, BLOCK_R)
        if FP32_DOT:
            x, f = x.to(tl.float32), f.to(tl.float32)
        low = tl.dot(x, f, low, input_precision="ieee")
    if STORE_MID:
        if pid_n == 0:
            tl.store(MID + rows[:, None] * s_mm + rr[None, :] * s_mr, low, mask=valid[:, None] & (rr[None, :] < RANK))
    s_ptr = S + ad * s_sl + rr[:, None] * s_sr + rn[None, :] * s_sn
    s_t = tl.load(s_ptr, mask=(rr[:, None] < RANK) & (rn[None, :] < N), other=0.0)  # S_l^T tile (BLOCK_R, BLOCK_N)
    if FP32_DOT:
        s_t = s_t.to(tl.float32)
    low *= tl.load(SCALE + ad)
    out_ptr = OUT + rows[:, None] * s_om + rn[None, :] * s_on
    out_mask = valid[:, None] & (rn[None, :] < N)
    acc = tl.load(out_ptr, mask=out_mask, other=0.0).to(tl.float32)  # this tile's rows of the base output
    acc = tl.dot(low.to(s_t.dtype), s_t, acc, input_precision="ieee")
    tl.store(out_ptr, acc, mask=out_mask)


@dataclass
class Segments:
    """The batch plan: token rows sorted by adapter, segments per adapter, tiles of BLOCK_M rows.
    A server computes it once per batch and reuses it in every layer."""

    rows: torch.Tensor  # (M',) token rows that have an adapter, sorted by adapter
    seg_start: torch.Tensor  # (S + 1,) segment g is rows[seg_start[g]:seg_start[g + 1]]
    seg_adapter: torch.Tensor  # (S,) the adapter of each segment
    tile_start: torch.Tensor  # (tiles,) positions in `rows` where each tile starts
    tile_end: torch.Tensor  # (tiles,) ... and ends (exclusive)
    tile_adapter: torch.Tensor  # (tiles,)
    block_m: int

    @classmethod
    def build(cls, token_indices: torch.Tensor, block_m: int) -> Segments:
        """From one adapter index per token (-1: none)."""
        order = torch.argsort(token_indices, stable=True)
        order = order[token_indices[order] >= 0]
        adapters, counts = torch.unique_consecutive(token_indices[order], return_counts=True)
        seg_start = torch.cat([counts.new_zeros(1), counts.cumsum(0)])  # (S + 1,)
        n_tiles = (counts + block_m - 1) // block_m  # (S,)
        tile_seg = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), n_tiles)
        first_tile = torch.repeat_interleave(n_tiles.cumsum(0) - n_tiles, n_tiles)
        tile_start = seg_start[tile_seg] + (torch.arange(len(tile_seg), device=counts.device) - first_tile) * block_m
        tile_end = torch.minimum(tile_start + block_m, seg_start[tile_seg + 1])
        i32 = dict(dtype=torch.int32)
        return cls(
            order.to(**i32), seg_start.to(**i32), adapters.to(**i32),
            tile_start.to(**i32), tile_end.to(**i32), adapters[tile_seg].to(**i32), block_m,
        )  # fmt: skip


def sgmv(x, f, s, out, scalings, plan: Segments, store_mid=False, blocks=None):
    """Launch `_sgmv_kernel`: out[rows] += s_l (x[rows] f_l^T) s_l^T in place on out (M, N); x f^T if store_mid."""
    (m, k), n, rank = x.shape, out.shape[1], f.shape[1]
    _, bn, bk, _ = blocks or default_blocks(x, m, n)
    mid = torch.zeros(m, rank, device=x.device, dtype=torch.float32) if store_mid else out  # (M, rank)
    grid = (plan.tile_start.numel(), triton.cdiv(n, bn))
    if grid[0]:
        launch(
            _sgmv_kernel, grid, x, f, s, out, mid,
            plan.rows, plan.tile_start, plan.tile_end, plan.tile_adapter, scalings, k, n, rank,
            *x.stride(), *f.stride(), *s.stride(), *out.stride(), *mid.stride(),
            STORE_MID=store_mid, FP32_DOT=fp32_dot(x),
            BLOCK_M=plan.block_m, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=rank_block(rank),
        )  # fmt: skip
    return mid if store_mid else None


class MultiLoRA(torch.autograd.Function):
    """base + per-row LoRA deltas, with gradients for x, base and the stacked A and B."""

    @staticmethod
    def forward(ctx, x2, base2, a_stack, b_stack, scalings, plan, blocks):
        out = base2.to(torch.float32 if fp32_dot(x2) else x2.dtype).clone()  # (M, N): the base, plus deltas in place
        needs_grad = any(ctx.needs_input_grad[i] for i in (0, 2, 3))
        xa = sgmv(x2, a_stack, b_stack, out, scalings, plan, store_mid=needs_grad, blocks=blocks)
        ctx.save_for_backward(x2, a_stack, b_stack, scalings, xa)
        ctx.plan, ctx.blocks = plan, blocks
        return out.to(x2.dtype)

    @staticmethod
    def backward(ctx, grad):
        x2, a_stack, b_stack, scalings, xa = ctx.saved_tensors
        plan = ctx.plan
        dx = torch.zeros(x2.shape, device=x2.device, dtype=torch.float32)  # (M, K)
        # dx_i = s_l (g_i B_l) A_l: the same kernel with F_l = B_l^T (r, N) and S_l = A_l^T (K, r)
        gb = sgmv(grad, b_stack.transpose(1, 2), a_stack.transpose(1, 2), dx, scalings, plan, True, ctx.blocks)
        grad_a, grad_b = torch.zeros(a_stack.shape, device=x2.device), torch.zeros(b_stack.shape, device=x2.device)
        common = dict(seg_start=plan.seg_start, seg_id=plan.seg_adapter, scales=scalings, rows=plan.rows)
        segment_outer(gb, x2, grad_a, **common)  # dA_l = s_l sum_i (g_i B_l)^T x_i
        segment_outer(grad, xa, grad_b, **common)  # dB_l = s_l sum_i g_i^T (x_i A_l^T)
        grad_base = grad.clone() if ctx.needs_input_grad[1] else None  # a copy: the caller may accumulate into it
        return dx.to(x2.dtype), grad_base, grad_a.to(a_stack.dtype), grad_b.to(b_stack.dtype), None, None, None


def multi_lora(
    x: torch.Tensor,
    indices: torch.Tensor,
    a_stack: torch.Tensor,
    b_stack: torch.Tensor,
    scalings: torch.Tensor,
    base: torch.Tensor | None = None,
    blocks: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Per-row LoRA on top of `base` (zeros if None); x (B, ..., K), indices (B,) into the stacks, -1 for none.
    Same contract as `reference.multi_lora`; differentiable in x, base, a_stack and b_stack."""
    n_adapters, rank, k = a_stack.shape
    n = b_stack.shape[1]
    if x.shape[-1] != k or b_stack.shape != (n_adapters, n, rank) or scalings.shape != (n_adapters,):
        raise ValueError(
            f"multi-LoRA shapes do not fit: x (..., {x.shape[-1]}), a_stack {tuple(a_stack.shape)} = (L, r, d_in), "
            f"b_stack {tuple(b_stack.shape)} = (L, d_out, r), scalings {tuple(scalings.shape)} = (L,)"
        )
    if indices.shape != x.shape[:1]:
        raise ValueError(f"indices must hold one adapter index per row of x: shape {tuple(x.shape[:1])}, got "
                         f"{tuple(indices.shape)}")  # fmt: skip
    if indices.numel() and (indices.max() >= n_adapters or indices.min() < -1):
        raise ValueError(f"indices must lie in [-1, {n_adapters - 1}] (-1 = no adapter), got {indices.tolist()}")
    x2 = x.reshape(-1, k)  # (M, K): all tokens
    token_indices = indices.repeat_interleave(x2.shape[0] // max(x.shape[0], 1))  # (M,)
    plan = Segments.build(token_indices, (blocks or default_blocks(x, x2.shape[0], n))[0])
    base2 = torch.zeros(x2.shape[0], n, device=x.device, dtype=x.dtype) if base is None else base.reshape(-1, n)
    out = MultiLoRA.apply(x2, base2, a_stack, b_stack, scalings.float(), plan, blocks)
    return out.reshape(*x.shape[:-1], n)
