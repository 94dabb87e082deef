"""Adapters on a half-precision base, as peft makes them (`autocast_adapter_dtype=True`, its default): every
method's trainable tensors are float32 on a bfloat16 or float16 base, the model's outputs keep the base's dtype,
gradients reach the float32 tensors, and the outputs are the float32 computation's up to the base's rounding.
LoRA is compared with HF peft on the same base and weights; `autocast_adapter_dtype=False` keeps the base's dtype."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch

import minipeft as mp
from tests.cases import CASES, outputs
from tests.cases import MODELS as ALL_MODELS

MODELS = {k: ALL_MODELS[k] for k in ("bert", "gpt2", "llama")}
PAIRS = [(m, k) for m in sorted(CASES) for k in sorted(MODELS) if k in CASES[m].kinds]
IDS = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method,kind", PAIRS)
def test_float32_adapter_on_a_bfloat16_base(method, kind):
    torch.manual_seed(0)
    model = mp.get_peft_model(MODELS[kind]().to(torch.bfloat16), CASES[method].config(kind, False))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    out = outputs(model, IDS)
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in trainable if p.grad is not None]  # (BERT's pooler is not on last_hidden_state's path)
    assert grads and all(g.dtype == torch.float32 for g in grads)
    reference = copy.deepcopy(model).float()  # the same adapter, computed in float32 throughout
    with torch.no_grad():
        # bfloat16 keeps 8 bits of mantissa: logits of size ~1-4 round by up to ~0.02 per layer
        torch.testing.assert_close(out.detach().float(), outputs(reference, IDS), rtol=0.05, atol=0.1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lora_equals_hf_peft_on_a_half_precision_base(dtype, tmp_path):
    cfg = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights=False)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(MODELS["gpt2"]().to(dtype), peft.LoraConfig(**cfg)).eval()
    ours = mp.get_peft_model(MODELS["gpt2"]().to(dtype), mp.LoraConfig(**cfg)).eval()
    dtypes = {(n.split(".")[-2], p.dtype) for n, p in theirs.named_parameters() if "lora_" in n}
    assert dtypes == {(n.split(".")[-2], p.dtype) for n, p in ours.named_parameters() if "lora_" in n}
    theirs.save_pretrained(tmp_path)
    loaded = mp.PeftModel.from_pretrained(MODELS["gpt2"]().to(dtype), tmp_path)
    assert {p.dtype for n, p in loaded.named_parameters() if "lora_" in n} == {torch.float32}
    with torch.no_grad():
        expected = theirs(input_ids=IDS).logits
        torch.testing.assert_close(loaded(input_ids=IDS).logits, expected, rtol=0, atol=1e-2)
        loaded.merge_adapter()  # a float32 update folded into the half-precision weight
        torch.testing.assert_close(loaded(input_ids=IDS).logits, expected, rtol=0.05, atol=0.1)


def test_autocast_off_keeps_the_base_dtype():
    base = MODELS["llama"]().to(torch.bfloat16)
    model = mp.get_peft_model(base, mp.LoraConfig(r=2, target_modules=["q_proj"]), autocast_adapter_dtype=False)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    model.add_adapter("b", mp.IA3Config(target_modules=["v_proj"], feedforward_modules=[]))
    assert {p.dtype for p in model.adapter_state_dict("b").values()} == {torch.float32}  # the default again
    assert {p.dtype for p in model.adapter_state_dict("default").values()} == {torch.bfloat16}
