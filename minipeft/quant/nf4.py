"""NF4, the 4-bit NormalFloat data type, with block-wise absmax scaling, two codes per
byte and double quantization of the scales (Dettmers, Pagnoni, Holtzman and Zettlemoyer,
2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314). Taught in
chapter 09.

A block of 64 weights is divided by its absolute maximum, so it lies in [-1, 1], and
each value is replaced by the index of the nearest of 16 levels. NF4 puts the levels at
quantiles of a normal distribution (pretrained weights are roughly normal), so each level
is hit about equally often. The 16 levels are asymmetric, 7 negative, 0 and 8 positive,
so that 0 is exact and all 16 codes are used. Storage: 4 bits per weight plus one fp32
scale per block (0.5 bits per weight); double quantization stores the scales in 8 bits
(blocks of 256, one fp32 scale each), which saves 0.373 bits per weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The outermost probability: the centre of the last bin when [0, 1] is cut into 15 or 16
# equal bins, averaged (the two halves of the type have 7 and 8 non-zero levels). It keeps
# the extreme quantiles finite; the QLoRA reference implementation uses the same value.
NF4_OFFSET = 0.5 * ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16)))


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 levels in [-1, 1], ascending: quantiles of N(0, 1), rescaled by the largest."""
    probit = torch.special.ndtri  # the normal quantile function
    positive = probit(torch.linspace(0.5, NF4_OFFSET, 9, dtype=torch.float64)[1:])  # 8 levels > 0
    negative = -probit(torch.linspace(0.5, NF4_OFFSET, 8, dtype=torch.float64)[1:])  # 7 levels < 0
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (levels / levels.max()).float()  # (16,), -1 and 1 exact


def int4_levels() -> torch.Tensor:
    """Symmetric 4-bit integers k/7, k = -7..7 (15 levels; absmax scaling cannot use -8)."""
    return torch.arange(-7, 8, dtype=torch.float32) / 7


def fp4_levels() -> torch.Tensor:
    """4-bit floats (1 sign, 2 exponent, 1 mantissa bits: 0, 0.5, 1, 1.5, 2, 3, 4, 6), over 6."""
    magnitudes = [m / 2 * 2.0**e if e == 0 else (1 + m / 2) * 2.0 ** (e - 1) for e in range(4) for m in range(2)]
    values = torch.tensor(magnitudes + [-v for v in magnitudes]).unique()  # +0 and -0 collapse
    return values / values.max()  # (15,)


def _blocks(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    if not torch.is_floating_point(x):
        raise TypeError(f"can only quantize floating-point weights, got dtype {x.dtype}")
    if blocksize < 1 or x.numel() % blocksize:
        raise ValueError(
            f"blocksize={blocksize} does not divide the {x.numel()} elements of a tensor of shape "
            f"{tuple(x.shape)}; use a blocksize that divides it (64 is the QLoRA default)"
        )
    return x.detach().float().contiguous().view(-1, blocksize)  # (n_blocks, blocksize)


def quantize_blockwise(x: torch.Tensor, levels: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-level codes (uint8, flat) and the fp32 absmax of each block of `blocksize` values."""
    blocks = _blocks(x, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    normed = blocks / torch.where(absmax > 0, absmax, 1.0)[:, None]  # (n_blocks, blocksize) in [-1, 1]
    levels = levels.to(normed.device)
    midpoints = (levels[1:] + levels[:-1]) / 2  # decision boundaries between neighbouring levels
    codes = torch.bucketize(normed, midpoints)  # index of the nearest level
    return codes.to(torch.uint8).flatten(), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Level value times block scale, flat fp32."""
    values = levels.to(absmax.device)[codes.long()].view(absmax.numel(), -1)  # (n_blocks, blocksize)
    return (values * absmax[:, None]).flatten()


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte: the first in the high nibble. (n,) -> (n / 2,) uint8."""
    if codes.numel() % 2 or (codes.numel() and int(codes.max()) > 15):
        raise ValueError("pack_4bit needs an even number of codes, each in 0..15")
    pairs = codes.to(torch.uint8).view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_4bit(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_4bit: (n / 2,) uint8 -> (n,) codes."""
    return torch.stack([packed >> 4, packed & 0x0F], dim=1).flatten()


@dataclass
class NF4Tensor:
    """A weight in NF4: packed codes plus its block scales, plain or double-quantized."""

    packed: torch.Tensor  # (numel / 2,) uint8
    absmax: torch.Tensor  # (numel / blocksize,) fp32, or uint8 codes when double-quantized
    shape: torch.Size  # of the original weight
    dtype: torch.dtype  # of the original weight: what dequantize() returns by default
    blocksize: int = 64  # weights per scale
    absmax_scale: torch.Tensor | None = None  # (ceil(n_blocks / 256),) fp32, double quantization only
    absmax_offset: torch.Tensor | None = None  # () fp32 mean of the scales, double quantization only

    def scales(self) -> torch.Tensor:
        """The fp32 block scales (decoded from 8 bits when double-quantized)."""
        if self.absmax_scale is None:
            return self.absmax
        padded = torch.zeros(self.absmax_scale.numel() * DQ_BLOCKSIZE, dtype=torch.uint8, device=self.absmax.device)
        padded[: self.absmax.numel()] = self.absmax
        decoded = dequantize_blockwise(padded, self.absmax_scale, int8_levels())[: self.absmax.numel()]
        return decoded + self.absmax_offset

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight back in floating point: each byte looks up its two levels at once."""
        levels = nf4_levels().to(self.packed.device)
        pairs = torch.cartesian_prod(levels, levels)  # (256, 2): byte value -> (high, low) level
        values = F.embedding(self.packed.int(), pairs).view(-1, self.blocksize)  # (n_blocks, blocksize)
        return (values * self.scales()[:, None]).view(self.shape).to(dtype or self.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("packed", "absmax", "absmax_scale", "absmax_offset")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_parameter(self) -> float:
        return 8 * self.nbytes / self.shape.numel()


# Double quantization: the scales in blocks of 256, on a symmetric 8-bit grid.
DQ_BLOCKSIZE = 256


def int8_levels() -> torch.Tensor:
    """k/127, k = -127..127: the 8-bit grid of the second quantization."""
    return torch.arange(-127, 128, dtype=torch.float32) / 127


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantize a floating-point weight to NF4 (blocks of `blocksize`), optionally double-quantized."""
    codes, absmax = quantize_blockwise(weight, nf4_levels(), blocksize)
    out = NF4Tensor(pack_4bit(codes), absmax, weight.shape, weight.dtype, blocksize)
    if double_quant:
        # The scales are positive and alike: centre them, then 8 bits per scale in blocks of 256.
        offset = absmax.mean()
        n_pad = -absmax.numel() % DQ_BLOCKSIZE
        centred = torch.cat([absmax - offset, absmax.new_zeros(n_pad)])
        codes2, scale2 = quantize_blockwise(centred, int8_levels(), DQ_BLOCKSIZE)
        out.absmax, out.absmax_scale, out.absmax_offset = codes2[: absmax.numel()], scale2, offset
    return out


def nf4_nbytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes an NF4Tensor of `numel` weights takes: the closed form the memory estimator uses."""
    n_blocks = numel // blocksize
    if not double_quant:
        return numel // 2 + 4 * n_blocks
    return numel // 2 + n_blocks + 4 * -(-n_blocks // DQ_BLOCKSIZE) + 4
