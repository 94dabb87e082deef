"""Plain-torch references for the Triton kernels (chapters 10 and 11).

Each function computes in fp32 and casts the result back, the way the kernels
accumulate, so a kernel is judged against the exact maths and not against another
rounding scheme. The references are written for clarity, not speed: `multi_lora`
gathers a full copy of each row's factors.

Notation (chapter 10): x (M, d_in), W (d_out, d_in) in nn.Linear layout, A (r, d_in),
B (d_out, r), s the LoRA scaling; leading dimensions of x are flattened into M.
"""

from __future__ import annotations

import torch


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """y = x W^T + b + s (x A^T) B^T, in fp32, returned in x's dtype."""
    xf = x.float()  # (..., d_in)
    y = xf @ weight.float().T + scaling * (xf @ lora_a.float().T) @ lora_b.float().T  # (..., d_out)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def lora_linear_backward(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    grad_y: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dA, dB) of `lora_linear` for an upstream gradient g = dL/dy, W frozen.

    The derivation of chapter 10, written out:
        dx = g W + s (g B) A        dA = s (g B)^T x        dB = s g^T (x A^T)
    """
    d_in, d_out = weight.shape[1], weight.shape[0]
    xf = x.float().reshape(-1, d_in)  # (M, d_in)
    g = grad_y.float().reshape(-1, d_out)  # (M, d_out)
    a, b = lora_a.float(), lora_b.float()
    xa = xf @ a.T  # (M, r)
    gb = g @ b  # (M, r)
    dx = g @ weight.float() + scaling * gb @ a  # (M, d_in)
    grad_a = scaling * gb.T @ xf  # (r, d_in)
    grad_b = scaling * g.T @ xa  # (d_out, r)
    return dx.reshape(x.shape).to(x.dtype), grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype)


def multi_lora(
    x: torch.Tensor,
    indices: torch.Tensor,
    a_stack: torch.Tensor,
    b_stack: torch.Tensor,
    scalings: torch.Tensor,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """Row i of x gets adapter l = indices[i] (-1: none): base_i + s_l (x_i A_l^T) B_l^T.

    x (B, ..., d_in) with indices (B,): every token of row i uses the same adapter.
    a_stack (L, r, d_in), b_stack (L, d_out, r), scalings (L,).
    """
    d_in, d_out = x.shape[-1], b_stack.shape[1]
    tokens = x.reshape(x.shape[0], -1, d_in).float()  # (B, T, d_in)
    keep = (indices >= 0).float()  # (B,)
    idx = indices.clamp_min(0)
    a, b = a_stack.float()[idx], b_stack.float()[idx]  # (B, r, d_in), (B, d_out, r): one copy per row
    s = scalings.float()[idx] * keep  # (B,)
    low = torch.einsum("btk,brk->btr", tokens, a)  # (B, T, r)
    delta = torch.einsum("btr,bnr->btn", low, b) * s[:, None, None]  # (B, T, d_out)
    delta = delta.reshape(*x.shape[:-1], d_out)
    out = delta if base is None else base.float() + delta
    return out.to(x.dtype)
