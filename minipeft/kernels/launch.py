"""Launch helpers shared by the Triton kernels of chapters 10 and 11 (`lora_triton`,
`multi_lora`): block sizes, the rank padding, and Triton's CPU interpreter, which must be
on (TRITON_INTERPRET=1) before the kernels are defined, i.e. before this module is imported.
"""

from __future__ import annotations

import torch
import triton
from triton import knobs

# Whether the kernels are defined in Triton's CPU interpreter (TRITON_INTERPRET=1 at import).
INTERPRETED = bool(knobs.runtime.interpret)
try:  # the interpreter multiplies each tile with numpy: one BLAS thread is several times faster on small tiles
    from threadpoolctl import ThreadpoolController

    _BLAS = ThreadpoolController() if INTERPRETED else None
except ImportError:
    _BLAS = None


def default_blocks(x: torch.Tensor, m: int, n: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_N): tensor-core tiles on a GPU, with as many column tiles per
    program (each recomputes x A^T once) as still leaves two programs per SM; few large tiles in the
    slow interpreter."""
    if not x.is_cuda:
        return 64, 128, 128, 4
    bm, bn = 64, 128
    programs = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    group = max(1, min(8, programs // (2 * torch.cuda.get_device_properties(x.device).multi_processor_count)))
    return bm, bn, 32, group


def rank_block(rank: int) -> int:
    """The rank padded to a power of two, at least 16 (the smallest tl.dot operand)."""
    return max(16, triton.next_power_of_2(rank))


def fp32_dot(x: torch.Tensor) -> bool:
    return not x.is_cuda or x.dtype == torch.float32


def launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](...), with numpy's BLAS on one thread when interpreted."""
    if _BLAS is None:
        return kernel[grid](*args, **kwargs)
    with _BLAS.limit(limits=1, user_api="blas"):
        return kernel[grid](*args, **kwargs)
