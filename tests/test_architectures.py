"""The architectures table (core/architectures.py): every family it lists works with each method's
default targets. Tiny models of each family are built from transformers configs, offline; the
modules each default targets are compared with the names the family's own code gives them."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaModel,
    ViTConfig,
    ViTModel,
)

import minipeft as mp
from minipeft.core import ARCHITECTURES
from minipeft.models import tiny_bert, tiny_gpt2, tiny_llama

DECODER = dict(
    num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=128, max_position_embeddings=64, head_dim=16,
)  # fmt: skip
ENCODER = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4)
FAMILIES = {
    "gpt2": tiny_gpt2,
    "llama": tiny_llama,
    "bert": tiny_bert,
    "mistral": lambda: MistralForCausalLM(MistralConfig(**DECODER)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**DECODER)),
    "gemma": lambda: GemmaForCausalLM(GemmaConfig(**DECODER)),
    "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(**DECODER)),
    "roberta": lambda: RobertaModel(RobertaConfig(vocab_size=128, max_position_embeddings=70, **ENCODER)),
    "vit": lambda: ViTModel(ViTConfig(image_size=16, patch_size=8, **ENCODER)),
}
# Per family, the last name component of the modules each default must find (two blocks each).
LLAMA = {"lora": {"q_proj", "v_proj"}, "ia3": {"k_proj", "v_proj", "down_proj"}, "houlsby": {"o_proj", "down_proj"}}
BERT = {"lora": {"query", "value"}, "ia3": {"key", "value", "dense"}, "houlsby": {"dense"}}
EXPECTED = {
    "gpt2": {"lora": {"c_attn"}, "ia3": {"c_attn", "c_proj"}, "houlsby": {"c_proj"}},
    **dict.fromkeys(["llama", "mistral", "qwen2", "gemma", "gemma2"], LLAMA),
    **dict.fromkeys(["bert", "roberta"], BERT),
    "vit": {"lora": {"q_proj", "v_proj"}, "ia3": {"k_proj", "v_proj", "fc2"}, "houlsby": {"o_proj", "fc2"}},
}


def inputs(family: str, model: torch.nn.Module) -> dict:
    if family == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))}
    return {"input_ids": torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))}


def output(model, batch) -> torch.Tensor:
    out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def test_every_family_in_the_table_is_tested():
    assert sorted(ARCHITECTURES) == sorted(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize(
    "method,config",
    [
        ("lora", lambda: mp.LoraConfig(r=2, init_lora_weights=False)),
        ("ia3", lambda: mp.IA3Config(init_ia3_weights=False)),
        ("houlsby", lambda: mp.AdapterConfig(placement="houlsby", bottleneck_size=4, init_weights=False)),
    ],
)
def test_defaults_find_the_familys_modules_and_change_the_output(family, method, config):
    torch.manual_seed(0)
    base = FAMILIES[family]().eval()
    batch = inputs(family, base)
    with torch.no_grad():
        before = output(base, batch)
    model = mp.get_peft_model(base, config()).eval()
    wrapped = [n for n, m in model.base_model.model.named_modules() if isinstance(m, mp.core.TunerLayer)]
    assert {n.split(".")[-1] for n in wrapped} == EXPECTED[family][method]
    per_block = len(wrapped) / 2
    assert per_block == int(per_block) and all(".0." in n or ".1." in n for n in wrapped)
    with torch.no_grad():
        assert not torch.allclose(output(model, batch), before, atol=1e-6)
    if method == "ia3":  # feed-forward targets rescale their input: (1, d_ff) vectors
        ffn = [m for n, m in model.base_model.model.named_modules() if isinstance(m, mp.core.TunerLayer)
               and m.is_feedforward["default"]]  # fmt: skip
        assert len(ffn) == 2 and all(m.ia3_l["default"].shape == (1, m.in_features) for m in ffn)


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen2", "gemma", "gemma2", "bert", "roberta", "vit"])
def test_parallel_adapter_sits_beside_each_ffn(family):
    torch.manual_seed(0)
    base = FAMILIES[family]().eval()
    batch = inputs(family, base)
    with torch.no_grad():
        before = output(base, batch)
    model = mp.get_peft_model(base, mp.ParallelAdapterConfig(bottleneck_size=4, init_weights=False)).eval()
    wrapped = [n for n, m in model.base_model.model.named_modules() if isinstance(m, mp.core.TunerLayer)]
    assert len(wrapped) == 2 and all(n.endswith(("mlp", "output")) for n in wrapped)
    with torch.no_grad():
        assert not torch.allclose(output(model, batch), before, atol=1e-6)
        with model.disable_adapter():
            torch.testing.assert_close(output(model, batch), before, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma", "gemma2"])
def test_prefix_tuning_reads_the_kv_shape_from_the_config(family):
    model = mp.get_peft_model(FAMILIES[family](), mp.PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=False))
    config = model.peft_config["default"]
    assert (config.num_layers, config.num_attention_heads, config.token_dim) == (2, 2, 2 * 16)
    with torch.no_grad():
        out = model(input_ids=torch.randint(3, 100, (2, 5))).logits
    assert out.shape == (2, 5, 128) and torch.isfinite(out).all()
