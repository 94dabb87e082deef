"""The layer types minipeft adapts, and all it knows about each: nn.Linear, GPT-2's Conv1D,
nn.Embedding, nn.Conv1d, nn.Conv2d and nn.Conv3d. Written once here, and used by `core/layers.py`
(shapes, merge) and by the methods (their forward passes) instead of branching on layouts themselves.

Every one of them is a linear map in disguise. A method sees its weight as one matrix
W (d_out, fan_in) in nn.Linear's layout, and writes its update Delta W in that layout too:

    type          stored weight                W (d_out, fan_in)                      input x
    nn.Linear     (out, in)                    as stored                              (..., in)
    Conv1D        (in, out)                    transposed                             (..., in)
    nn.Embedding  (num_embeddings, dim)        transposed: a lookup is W one_hot(x)   (...) indices
    nn.ConvNd     (out, in / groups, *kernel)  reshaped to (out, in / groups * k)     (B, in, *spatial)

`to_stored` lays a matrix out as the base stores its weight (merging), `apply_weight` applies a
matrix to x the way the base applies its own (a lookup, or a convolution with the base's stride,
padding, dilation and groups), and `per_feature` shapes a vector over the feature axis of an
activation (last for linears, 1 for convolutions). Taught in chapter 02 (nn.Linear, Conv1D);
tests/test_layer_types.py runs every method on every type, and compares each pair with HF peft.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .targets import is_linear

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}  # by number of spatial axes


def is_conv(base: nn.Module) -> bool:
    return isinstance(base, CONV_TYPES)


def is_gpt2_conv1d(base: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2), which stores its weight transposed; peft calls it `fan_in_fan_out`."""
    return isinstance(base, Conv1D)


def is_adaptable(base: nn.Module) -> bool:
    """One of the layer types this file describes."""
    return is_linear(base) or isinstance(base, (Conv1D, nn.Embedding, *CONV_TYPES))


def features(base: nn.Module) -> tuple[int, int]:
    """(d_in, d_out): input and output features, channels, or (num_embeddings, embedding_dim)."""
    if isinstance(base, Conv1D):
        d_in, d_out = base.weight.shape
        return d_in, d_out
    if isinstance(base, nn.Embedding):
        return base.num_embeddings, base.embedding_dim
    if is_conv(base):
        return base.in_channels, base.out_channels
    if is_linear(base):  # nn.Linear, or a linear stored in another form (chapter 09's 4-bit base)
        return base.in_features, base.out_features
    raise TypeError(
        f"expected nn.Linear, transformers Conv1D, nn.Embedding or nn.Conv1d/2d/3d, got {type(base).__name__}"
    )


def kernel_size(base: nn.Module) -> tuple[int, ...]:
    """The convolution's kernel, () for the other types."""
    return tuple(base.kernel_size) if is_conv(base) else ()


def matrix_shape(base: nn.Module) -> tuple[int, int]:
    """(d_out, fan_in) of the weight seen as a matrix; fan_in = d_in / groups * prod(kernel) for convolutions."""
    d_in, d_out = features(base)
    if is_conv(base):
        return d_out, d_in // base.groups * math.prod(base.kernel_size)
    return d_out, d_in


def weight_matrix(base: nn.Module) -> torch.Tensor:
    """The base weight as W (d_out, fan_in), a view of what the module stores."""
    weight = base.weight
    if isinstance(base, (Conv1D, nn.Embedding)):
        return weight.T  # (in, out) or (num_embeddings, dim) stored
    if is_conv(base):
        return weight.reshape(weight.shape[0], -1)  # (out, in / groups * k)
    return weight


def to_stored(base: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """A (d_out, fan_in) matrix laid out as the base stores its weight (the inverse of `weight_matrix`)."""
    if isinstance(base, (Conv1D, nn.Embedding)):
        return matrix.T
    if is_conv(base):
        return matrix.reshape(base.weight.shape)  # (out, in / groups, *kernel)
    return matrix


def apply_weight(base: nn.Module, x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """What the base computes from x, without bias, with `matrix` (rows, fan_in) as its weight.
    `rows` need not be d_out: LoRA applies its A (r, fan_in) this way, so A sees what W sees."""
    if isinstance(base, nn.Embedding):  # x: (...) indices -> (..., rows); peft passes padding_idx too
        out = F.embedding(x, matrix.T, padding_idx=base.padding_idx)
        scale = getattr(base, "embed_scale", None)  # a scaled embedding (Gemma 3) multiplies its lookups
        return out if scale is None else out * torch.as_tensor(scale).to(out.dtype)
    if is_conv(base):  # x: (B, in, *spatial) -> (B, rows, *spatial')
        weight = matrix.reshape(matrix.shape[0], *base.weight.shape[1:])  # (rows, in / groups, *kernel)
        conv = CONV_FN[len(base.kernel_size)]  # F.conv1d, F.conv2d or F.conv3d
        return conv(x, weight, None, base.stride, base.padding, base.dilation, base.groups)
    return F.linear(x, matrix)  # (..., rows)


def apply_pointwise(base: nn.Module, h: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """matrix (rows, k) applied to the k features at every position of h: on the last axis, or as a
    1x1 convolution on axis 1 (LoRA's B)."""
    if features_last(base):
        return F.linear(h, matrix)  # (..., rows)
    n = h.dim() - 2  # spatial axes
    return CONV_FN[n](h, matrix.view(*matrix.shape, *[1] * n))  # (B, rows, *spatial)


def features_last(base: nn.Module) -> bool:
    """True if activations carry features on the last axis (linears, embeddings); False: axis 1 (convolutions)."""
    return not is_conv(base)


def per_feature(base: nn.Module, vector: torch.Tensor, ndim: int) -> torch.Tensor:
    """A vector (d,) or per-row vectors (B, d) shaped to broadcast over an activation with `ndim` axes
    along its feature axis: (..., d) for linears, (B, d, 1, ...) for convolutions."""
    lead, d = vector.shape[:-1], vector.shape[-1]
    if features_last(base):
        return vector.view(*lead, *[1] * (ndim - 1 - len(lead)), d)  # (B, 1, ..., d) or (d,)
    return vector.view(*lead, d, *[1] * (ndim - 2))  # (B, d, 1, ...) or (d, 1, ...)


def feature_param_shape(base: nn.Module, d: int) -> tuple[int, ...]:
    """How peft stores a per-feature vector of a convolution ((1, d, 1, ...)); () means 'as the method likes'."""
    return (1, d, *[1] * len(base.kernel_size)) if is_conv(base) else ()


def down_projection(base: nn.Module, r: int) -> nn.Module:
    """A module mapping the base's input to r features with the base's geometry: nn.Linear(d_in, r), or a
    convolution (d_in -> r) with the base's kernel, stride, padding and dilation (LoRA's A)."""
    d_in, _ = features(base)
    kwargs = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
    if is_conv(base):
        return type(base)(d_in, r, base.kernel_size, base.stride, base.padding, base.dilation, **kwargs)
    return nn.Linear(d_in, r, **kwargs)


def up_projection(base: nn.Module, r: int) -> nn.Module:
    """A module mapping r features to the base's output, pointwise: nn.Linear(r, d_out) or a 1x1 convolution."""
    _, d_out = features(base)
    kwargs = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
    if is_conv(base):
        return type(base)(r, d_out, 1, **kwargs)
    return nn.Linear(r, d_out, **kwargs)
