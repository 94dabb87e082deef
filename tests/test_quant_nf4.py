"""NF4 and double quantization (minipeft/quant/nf4.py) against the QLoRA paper: its
published level table, the error bound block-wise absmax scaling implies, exact packing,
and the bits per parameter of double quantization."""

from __future__ import annotations

import pytest
import torch

from minipeft.quant import fp4_levels, int4_levels, nf4_levels, nf4_nbytes, quantize_nf4
from minipeft.quant.nf4 import (
    NF4_OFFSET,
    dequantize_blockwise,
    int8_levels,
    pack_4bit,
    quantize_blockwise,
    unpack_4bit,
)

# Dettmers et al. (2023), Appendix E: the NF4 values as published (and shipped by bitsandbytes).
PAPER_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]  # fmt: skip


def weights(shape=(256, 128), seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02


def test_levels_match_the_papers_table():
    torch.testing.assert_close(nf4_levels(), torch.tensor(PAPER_NF4), rtol=0, atol=1e-6)


def test_level_table_properties():
    levels = nf4_levels()
    assert levels.numel() == 16 and levels.unique().numel() == 16
    assert torch.all(levels[1:] > levels[:-1]), "ascending"
    assert (levels < 0).sum() == 7 and (levels > 0).sum() == 8, "asymmetric: 7 negative, 8 positive"
    assert {0.0, -1.0, 1.0} <= set(levels.tolist()), "0 and +-1 are represented exactly"


def test_levels_are_normal_quantiles():
    """Rescaled back, the 8 positive levels sit at evenly spaced probabilities in (0.5, offset],
    the 7 negative ones likewise below 0.5: equal-probability bins of N(0, 1) on each side."""
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    scale = normal.icdf(torch.tensor(NF4_OFFSET, dtype=torch.float64))
    probs = normal.cdf(nf4_levels().double() * scale)  # (16,)
    torch.testing.assert_close(probs[8:] - 0.5, (NF4_OFFSET - 0.5) * torch.arange(1, 9).double() / 8, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        0.5 - probs[:7], (NF4_OFFSET - 0.5) * torch.arange(7, 0, -1).double() / 7, rtol=0, atol=1e-6
    )


def test_round_trip_within_the_block_absmax_bound():
    w = weights()
    levels = nf4_levels()
    q = quantize_nf4(w, blocksize=64, double_quant=False)
    err = (q.dequantize() - w).abs().view(-1, 64)  # (n_blocks, 64)
    absmax = w.abs().view(-1, 64).amax(1, keepdim=True)
    half_gap = levels.diff().max() / 2  # the widest gap of the grid, halved
    assert torch.all(err <= absmax * half_gap + 1e-7)
    # Tighter, per element: the half-width of the gap each value falls into.
    codes, _ = quantize_blockwise(w, levels, 64)
    x = (w.view(-1, 64) / absmax).flatten()
    neighbour = torch.where(x >= levels[codes.long()], codes.long() + 1, codes.long() - 1).clamp(0, 15)
    bound = (levels[neighbour] - levels[codes.long()]).abs() / 2 * absmax.repeat_interleave(64, 0).flatten()
    assert torch.all(err.flatten() <= bound + 1e-7)
    assert torch.all(q.dequantize().view(-1, 64).abs().amax(1) == absmax.squeeze(1)), "absmax is exact"


def test_double_quantization_error_bound():
    w = weights((512, 256))
    plain, dq = quantize_nf4(w, double_quant=False), quantize_nf4(w, double_quant=True)
    absmax = plain.absmax
    scale_err = (dq.scales() - absmax).abs()
    bound = dq.absmax_scale.repeat_interleave(256)[: absmax.numel()] / 127 / 2  # half a step of the 8-bit grid
    assert torch.all(scale_err <= bound + 1e-7)
    assert scale_err.max() / absmax.mean() < 0.01
    assert (dq.dequantize() - w).abs().max() < 1.05 * (plain.dequantize() - w).abs().max()


def test_bits_per_parameter():
    w = weights((1024, 1024))
    plain, dq = quantize_nf4(w, double_quant=False), quantize_nf4(w)
    assert plain.bits_per_parameter == 4 + 32 / 64  # 4.5
    assert dq.bits_per_parameter == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-4)  # 4.127
    assert plain.bits_per_parameter - dq.bits_per_parameter == pytest.approx(0.373, abs=1e-3)  # the paper's saving


@pytest.mark.parametrize("shape,blocksize,dq", [((64, 32), 64, True), ((192, 64), 64, True), ((128, 128), 32, False)])
def test_closed_form_bytes(shape, blocksize, dq):
    assert quantize_nf4(weights(shape), blocksize, dq).nbytes == nf4_nbytes(shape[0] * shape[1], blocksize, dq)


def test_packing_is_exact():
    codes = torch.randint(0, 16, (1000,), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    packed = pack_4bit(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == 500
    assert torch.equal(unpack_4bit(packed), codes)
    assert packed[0] == codes[0] * 16 + codes[1], "first code in the high nibble"


def test_every_code_is_used_on_normal_weights():
    codes, _ = quantize_blockwise(weights((512, 512)), nf4_levels(), 64)
    counts = torch.bincount(codes.long(), minlength=16)
    assert torch.all(counts > 0)


def test_nf4_beats_int4_and_fp4_on_normal_weights():
    w = weights((512, 512))

    def mse(levels):
        codes, absmax = quantize_blockwise(w, levels, 64)
        return (dequantize_blockwise(codes, absmax, levels) - w.flatten()).pow(2).mean()

    assert mse(nf4_levels()) < mse(int4_levels()) and mse(nf4_levels()) < mse(fp4_levels())
    assert int8_levels().numel() == 255


def test_dtypes_round_trip():
    w = weights().to(torch.bfloat16)
    q = quantize_nf4(w)
    assert q.dequantize().dtype == torch.bfloat16 and q.dequantize(torch.float32).dtype == torch.float32


def test_all_zero_block():
    w = torch.zeros(4, 64)
    assert torch.equal(quantize_nf4(w).dequantize(), w)


def test_blocksize_that_does_not_divide():
    with pytest.raises(ValueError, match=r"blocksize=64 does not divide the 100 elements.*\(10, 10\)"):
        quantize_nf4(torch.randn(10, 10))


def test_non_float_weight():
    with pytest.raises(TypeError, match="floating-point.*torch.int64"):
        quantize_nf4(torch.arange(128).view(2, 64))


def test_pack_rejects_bad_codes():
    with pytest.raises(ValueError, match="even number of codes"):
        pack_4bit(torch.tensor([1, 2, 3], dtype=torch.uint8))
    with pytest.raises(ValueError, match="0..15"):
        pack_4bit(torch.tensor([1, 16], dtype=torch.uint8))
