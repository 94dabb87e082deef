"""PiSSA: Principal Singular values and Singular vectors Adaptation (Meng et al., 2024,
arXiv:2404.02948). Taught in chapter 07. Switched on with `LoraConfig(init_lora_weights="pissa")`.

LoRA starts the update at zero and lets training find its directions. PiSSA starts the
adapter *on* the weight's most important directions instead. With the SVD W0 = U S V^T,

    B = U_r sqrt(S_r / s),   A = sqrt(S_r / s) V_r^T,   W_res = W0 - s B A

so the adapter holds the top-r singular triplets and the frozen base becomes the residual
W_res. The sum W_res + s B A is W0 again: the model's outputs are unchanged at initialisation
(up to float rounding), but the trainable part now sits where the weight has most energy, which
makes training converge faster.

Two consequences the chapter spells out: the base layer is rewritten (so `disable_adapter()`
gives the residual model, not the original one), and loading a saved PiSSA adapter recomputes
the residual from the original base, as HF peft does, so the same base must be used.
"""

from __future__ import annotations

import torch

from ..core.layers import TunerLayer


@torch.no_grad()
def pissa_init(layer: TunerLayer, name: str) -> None:
    """Put the top-r singular triplets of the base weight into lora_A/lora_B; keep the residual."""
    weight = layer.weight  # (d_in, d_out) for Conv1D, else (d_out, d_in)
    if not weight.dtype.is_floating_point:
        raise TypeError(
            f"PiSSA needs a float base weight to take its SVD, got {weight.dtype}; initialise PiSSA on the "
            "unquantized model, then quantize the residual"
        )
    w0 = (weight.T if layer.fan_in_fan_out else weight).float()  # (d_out, d_in)
    r, limit = layer.lora_A[name].weight.shape[0], min(w0.shape)
    if r > limit:  # plain LoRA only warns (core/layers.py check_rank); PiSSA has no singular triplet past min
        raise ValueError(f"PiSSA needs r <= min(d_out, d_in) = {limit} (the number of singular values), got r={r}")
    u, s, vh = torch.linalg.svd(w0, full_matrices=False)  # (d_out, k), (k,), (k, d_in)
    lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    scaling = layer.scaling[name]
    root = (s[:r] / scaling).sqrt()  # (r,): splits sqrt(S_r) between A and B, undoing the scaling s
    lora_a.copy_(root[:, None] * vh[:r])  # (r, d_in)
    lora_b.copy_(u[:, :r] * root)  # (d_out, r)
    residual = w0 - scaling * lora_b.float() @ lora_a.float()  # (d_out, d_in): W_res
    weight.copy_((residual.T if layer.fan_in_fan_out else residual).to(weight.dtype))
