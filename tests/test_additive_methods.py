"""The additive methods against plain-torch references (forward hooks on an unwrapped copy
of the base model), and the behaviour the chapters rely on: adapter placement, folding a
prompt encoder, generation, missing masks, padded classification, prompt initialisation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2ForSequenceClassification

import minipeft as mp
from minipeft.additive.prompts import PromptTable
from tests.cases import MODELS, outputs

IDS = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(2))
# Per architecture: (attention output projection, FFN output projection, FFN sublayer) of block 0.
SITES = {
    "gpt2": ("transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj", "transformer.h.0.mlp"),
    "llama": ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj", "model.layers.0.mlp"),
    "bert": ("encoder.layer.0.attention.output.dense", "encoder.layer.0.output.dense", "encoder.layer.0.output"),
}


def wrapped(model) -> set[str]:
    return {n for n, m in model.base_model.model.named_modules() if isinstance(m, mp.core.TunerLayer)}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_houlsby_places_two_adapters_per_block_pfeiffer_one(kind):
    houlsby = wrapped(mp.get_peft_model(MODELS[kind](), mp.AdapterConfig(placement="houlsby", bottleneck_size=4)))
    pfeiffer = wrapped(mp.get_peft_model(MODELS[kind](), mp.AdapterConfig(placement="pfeiffer", bottleneck_size=4)))
    layers = MODELS[kind]().config.num_hidden_layers
    attn, ffn, _ = SITES[kind]
    assert len(houlsby) == 2 * layers and {attn, ffn} <= houlsby
    assert len(pfeiffer) == layers and ffn in pfeiffer and attn not in pfeiffer


def bottleneck(adapter, h):
    return adapter.up(torch.relu(adapter.down(h)))  # (..., d) -> (..., m) -> (..., d)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_serial_adapter_equals_hooks_on_the_base(kind):
    base = MODELS[kind]()
    reference = copy.deepcopy(base)
    model = mp.get_peft_model(base, mp.AdapterConfig(placement="houlsby", bottleneck_size=4, init_weights=False))
    for name, layer in model.base_model.model.named_modules():
        if isinstance(layer, mp.core.TunerLayer):  # h -> h + f(h) on the sublayer's output
            adapter = layer.adapter["default"]
            reference.get_submodule(name).register_forward_hook(lambda m, i, o, a=adapter: o + bottleneck(a, o))
    with torch.no_grad():
        torch.testing.assert_close(outputs(model, IDS), outputs(reference, IDS), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_parallel_adapter_equals_hooks_on_the_base(kind):
    base = MODELS[kind]()
    reference = copy.deepcopy(base)
    config = mp.ParallelAdapterConfig(bottleneck_size=4, scaling=2.0, init_weights=False)
    model = mp.get_peft_model(base, config)
    for name, layer in model.base_model.model.named_modules():
        if not isinstance(layer, mp.core.TunerLayer):
            continue
        a = layer.adapter["default"]
        if kind == "bert":  # LayerNorm(dense(h) + s f(x) + x): the branch joins the FFN output before the norm
            hook = lambda m, i, o, a=a: m.LayerNorm(m.dense(i[0]) + 2.0 * bottleneck(a, i[1]) + i[1])  # noqa: E731
        else:  # FFN(x) + s f(x)
            hook = lambda m, i, o, a=a: o + 2.0 * bottleneck(a, i[0])  # noqa: E731
        reference.get_submodule(name).register_forward_hook(hook)
    assert wrapped(model) == {n.replace(".0.", f".{i}.") for n in SITES[kind][2:] for i in range(2)}
    with torch.no_grad():
        torch.testing.assert_close(outputs(model, IDS), outputs(reference, IDS), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_ia3_equals_hooks_on_the_base(kind):
    base = MODELS[kind]()
    reference = copy.deepcopy(base)
    model = mp.get_peft_model(base, mp.IA3Config(init_ia3_weights=False))
    for name, layer in model.base_model.model.named_modules():
        if not isinstance(layer, mp.core.TunerLayer):
            continue
        vector = layer.ia3_l["default"].detach().flatten()
        if layer.is_feedforward["default"]:  # the FFN's intermediate activation, i.e. W_2's input
            reference.get_submodule(name).register_forward_pre_hook(lambda m, i, v=vector: (i[0] * v,))
        else:  # keys and values: the projection's output
            reference.get_submodule(name).register_forward_hook(lambda m, i, o, v=vector: o * v)
    with torch.no_grad():
        torch.testing.assert_close(outputs(model, IDS), outputs(reference, IDS), rtol=0, atol=1e-6)


def greedy_by_full_recompute(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Generation without any cache logic: one full forward of the whole sequence per new token."""
    for _ in range(steps):
        logits = model(input_ids=ids).logits[:, -1]  # (B, V)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize(
    "config", [mp.PromptTuningConfig(num_virtual_tokens=4), mp.PrefixTuningConfig(num_virtual_tokens=4)]
)
def test_generate_equals_full_recompute(config, kind):
    model = mp.get_peft_model(MODELS[kind](), config)
    with torch.no_grad():
        expected = greedy_by_full_recompute(model, IDS[:, :5], steps=5)
        got = model.generate(input_ids=IDS[:, :5], max_new_tokens=5, do_sample=False, pad_token_id=0)
        with model.disable_adapter():
            base = model.generate(input_ids=IDS[:, :5], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected)
    assert torch.equal(base, MODELS[kind]().generate(input_ids=IDS[:, :5], max_new_tokens=5, do_sample=False))


@pytest.mark.parametrize(
    "config,folded_count",
    [
        (mp.PrefixTuningConfig(num_virtual_tokens=3, encoder_hidden_size=16), 3 * 2 * 2 * 64),  # n L 2 d_kv
        (mp.PTuningConfig(num_virtual_tokens=3, encoder_reparameterization_type="LSTM"), 3 * 64),  # n d
        (mp.PTuningConfig(num_virtual_tokens=3), 3 * 64),
    ],
)
def test_fold_prompt_encoder_keeps_outputs_and_drops_the_reparameterisation(config, folded_count, tmp_path):
    model = mp.get_peft_model(MODELS["gpt2"](), config)
    before = outputs(model, IDS)
    assert model.get_nb_trainable_parameters()[0] > folded_count
    mp.fold_prompt_encoder(model)
    assert isinstance(model.get_input_embeddings().prompt_encoder["default"], PromptTable)
    assert model.get_nb_trainable_parameters()[0] == folded_count
    torch.testing.assert_close(outputs(model, IDS), before, rtol=0, atol=1e-6)
    model.save_pretrained(tmp_path)
    loaded = mp.PeftModel.from_pretrained(MODELS["gpt2"](), tmp_path)
    assert type(loaded.peft_config["default"]).__name__ != "PTuningConfig"  # a folded P-tuning prompt is a plain prompt
    torch.testing.assert_close(outputs(loaded, IDS), before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize(
    "config", [mp.PromptTuningConfig(num_virtual_tokens=3), mp.PrefixTuningConfig(num_virtual_tokens=3)]
)
def test_missing_attention_mask_means_attend_to_everything(config, kind):
    model = mp.get_peft_model(MODELS[kind](), config)
    with torch.no_grad():
        with_mask = model(input_ids=IDS, attention_mask=torch.ones_like(IDS))
        without = model(input_ids=IDS)
    key = "logits" if hasattr(without, "logits") else "last_hidden_state"
    torch.testing.assert_close(without[key], with_mask[key], rtol=0, atol=0)


@pytest.mark.parametrize(
    "config", [mp.PromptTuningConfig(num_virtual_tokens=3), mp.PrefixTuningConfig(num_virtual_tokens=3)]
)
def test_classifier_reads_the_last_real_token_of_right_padded_rows(config):
    torch.manual_seed(0)
    base = GPT2ForSequenceClassification(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=256, num_labels=3))
    base.config.pad_token_id = 0
    model = mp.get_peft_model(base.eval(), config)
    padded = torch.cat([IDS[:1, :6], torch.zeros(1, 4, dtype=torch.long)], dim=1)  # (1, 10), 4 pads
    mask = (padded != 0).long()
    with torch.no_grad():
        alone = model(input_ids=IDS[:1, :6]).logits
        in_batch = model(
            input_ids=torch.cat([padded, IDS[1:]]), attention_mask=torch.cat([mask, torch.ones_like(mask)])
        )
    torch.testing.assert_close(in_batch.logits[:1], alone, rtol=0, atol=1e-5)


def test_causal_lm_labels_skip_the_virtual_tokens():
    n = 4
    model = mp.get_peft_model(MODELS["gpt2"](), mp.PromptTuningConfig(num_virtual_tokens=n))
    out = model(input_ids=IDS, labels=IDS)
    # Virtual positions get label -100: the last one predicts real token 0, real token t predicts t + 1.
    logits = out.logits[:, n - 1 : -1]  # (B, T, V)
    expected = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), IDS.reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_prompt_initialisation_from_vocabulary_and_text(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "classify": 5, "the": 6, "topic": 7}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words).save_pretrained(tmp_path)
    vocab = MODELS["gpt2"]().get_input_embeddings().weight
    text = mp.PromptTuningConfig(
        num_virtual_tokens=5,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="classify the topic",
        tokenizer_name_or_path=str(tmp_path),
    )
    prompt = mp.get_peft_model(MODELS["gpt2"](), text).get_input_embeddings().prompt_encoder["default"].weight
    assert torch.equal(prompt, vocab[[5, 6, 7, 5, 6]])  # the text, repeated to fill n tokens
    sampled = mp.PromptTuningConfig(num_virtual_tokens=50, prompt_tuning_init="SAMPLE_VOCAB")
    prompt = mp.get_peft_model(MODELS["gpt2"](), sampled).get_input_embeddings().prompt_encoder["default"].weight
    assert all((row == vocab).all(-1).any() for row in prompt)
    random = mp.PromptTuningConfig(num_virtual_tokens=50)
    prompt = mp.get_peft_model(MODELS["gpt2"](), random).get_input_embeddings().prompt_encoder["default"].weight
    assert 0.8 < prompt.std() / vocab.std() < 1.25 and not (prompt[:, None] == vocab).all(-1).any()


def test_two_prompt_adapters_switch_and_delete():
    model = mp.get_peft_model(MODELS["gpt2"](), mp.PromptTuningConfig(num_virtual_tokens=3))
    model.add_adapter("long", mp.PromptTuningConfig(num_virtual_tokens=7))
    assert outputs(model, IDS).shape[1] == 3 + IDS.shape[1]
    model.set_adapter("long")
    assert outputs(model, IDS).shape[1] == 7 + IDS.shape[1]
    assert model.get_nb_trainable_parameters()[0] == 7 * 64
    model.set_adapter("default")
    model.delete_adapter("long")
    assert list(model.get_input_embeddings().prompt_encoder) == ["default"]


@pytest.mark.parametrize(
    "make",
    [
        lambda: mp.AdapterConfig(placement="houlsby", bottleneck_size=4, init_weights=False),
        lambda: mp.ParallelAdapterConfig(bottleneck_size=4, init_weights=False),
        lambda: mp.IA3Config(init_ia3_weights=False),
    ],
)
@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_mixed_batch_equals_each_row_alone(make, kind):
    torch.manual_seed(0)
    model = mp.get_peft_model(MODELS[kind](), make(), adapter_name="a")
    model.add_adapter("b", make())
    model.eval()
    rows = ["b", "__base__", "a"]
    ids = torch.randint(3, 200, (3, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=rows)
        mixed = mixed.logits if hasattr(mixed, "logits") else mixed.last_hidden_state
        for i, name in enumerate(rows):
            if name == "__base__":
                with model.disable_adapter():
                    alone = outputs(model, ids[i : i + 1])
            else:
                model.set_adapter(name)
                alone = outputs(model, ids[i : i + 1])
            torch.testing.assert_close(mixed[i : i + 1], alone, rtol=0, atol=1e-5)
    assert not torch.allclose(mixed[0], mixed[2], atol=1e-4), "the two adapters must differ"


def test_mixed_batch_of_prompts_is_refused():
    model = mp.get_peft_model(MODELS["gpt2"](), mp.PromptTuningConfig(num_virtual_tokens=3)).eval()
    with pytest.raises(ValueError, match="cannot mix them"):
        model(input_ids=IDS[:2], adapter_names=["default", "__base__"])
