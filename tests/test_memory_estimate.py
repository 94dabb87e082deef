"""The memory estimator (minipeft/memory.py, activation_memory.py) against tensors measured on
CPU (measure_training_memory: exact for weights, gradients and optimizer states, within 15%
for activations) and against published figures (LoRA and QLoRA papers)."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from safetensors import safe_open
from transformers import GPT2Config, LlamaConfig

import minipeft as mp
from minipeft.data import load_task, tokenize
from minipeft.memory import TrainingSetup, build_meta_model, estimate_memory, measure_training_memory
from minipeft.models import load_classifier, tiny_gpt2, tiny_llama

B, T = 4, 32
IDS = torch.randint(3, 200, (B, T), generator=torch.Generator().manual_seed(0))
TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}
BUILD = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def lora(kind: str = "gpt2", targets=None, **kw) -> mp.LoraConfig:
    return mp.LoraConfig(r=4, target_modules=targets or TARGETS[kind], **kw)


def compare(model, config, peft_config, setup: TrainingSetup, loss_fn) -> tuple[mp.memory.MemoryReport, object]:
    """(measured, estimated) for one training step."""
    measured = measure_training_memory(model, loss_fn, optimizer=setup.optimizer)
    return measured, estimate_memory(config, peft_config, setup)


def check(measured, estimate, tolerance: float = 0.15) -> None:
    assert (measured.weights, measured.gradients, measured.optimizer) == (
        estimate.weights,
        estimate.gradients,
        estimate.optimizer,
    ), (measured, estimate)
    assert abs(estimate.activations - measured.activations) <= tolerance * measured.activations, (measured, estimate)


# (model kind, PEFT config or None, setup fields, train mode (dropout on), quantization)
CASES = {
    "gpt2 full fp32": ("gpt2", None, {}, False, None),
    "gpt2 full bf16": ("gpt2", None, {"dtype": "bfloat16"}, False, None),
    "gpt2 lora": ("gpt2", lora(), {}, False, None),
    "gpt2 lora all-linear sgd": ("gpt2", lora(targets="all-linear"), {"optimizer": "sgd"}, False, None),
    "gpt2 lora dropout math": ("gpt2", lora(lora_dropout=0.1), {"attention": "math"}, True, None),
    "gpt2 full checkpointing": ("gpt2", None, {"gradient_checkpointing": True, "attention": "math"}, True, None),
    "gpt2 qlora": ("gpt2", lora(), {}, False, mp.NF4Config()),
    "llama full momentum": ("llama", None, {"optimizer": "sgd_momentum"}, False, None),
    "llama lora bf16": ("llama", lora("llama"), {"dtype": "bfloat16", "adapter_dtype": "base"}, False, None),
    "llama full eager": ("llama", None, {"attention": "math"}, False, None),
    "llama qlora checkpointing bf16": (
        "llama",
        lora("llama", targets="all-linear"),
        {"dtype": "bfloat16", "gradient_checkpointing": True, "adapter_dtype": "base"},
        True,
        mp.NF4Config(target_modules="all-linear", double_quant=False),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_estimate_matches_measured_tensors_on_tiny_models(case):
    kind, peft_config, fields, train, quantize = CASES[case]
    setup = TrainingSetup(B, T, dropout=train, quantization=quantize, **fields)
    base = BUILD[kind](**({"attn_implementation": "eager"} if fields.get("attention") == "math" else {}))
    base = base.to(getattr(torch, setup.dtype))
    config = copy.deepcopy(base.config)
    if setup.gradient_checkpointing:  # reentrant: the recomputation passes through the measuring hooks
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    autocast = setup.adapter_dtype == "float32"
    model = (
        base
        if peft_config is None
        else mp.get_peft_model(base, copy.deepcopy(peft_config), quantization=quantize, autocast_adapter_dtype=autocast)
    )
    model.train(train)
    measured, estimate = compare(model, config, peft_config, setup, lambda m: m(input_ids=IDS, labels=IDS).loss)
    check(measured, estimate)
    trainable, total = (
        model.get_nb_trainable_parameters() if peft_config else (sum(p.numel() for p in model.parameters()),) * 2
    )
    assert (estimate.trainable, estimate.params) == (trainable, total)


@pytest.fixture(scope="module")
def testbed_batch():
    data = load_task()
    tokenizer = load_classifier(len(data.label_names))[1]
    ids, mask, labels = tokenize(data.train_texts[:16], data.train_labels[:16], tokenizer, max_length=64).tensors
    n = int(mask.sum(1).max())
    return len(data.label_names), ids[:, :n], mask[:, :n], labels


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_estimate_matches_measured_tensors_on_the_testbed(testbed_batch, method):
    num_labels, ids, mask, labels = testbed_batch
    model = load_classifier(num_labels)[0]
    config = copy.deepcopy(model.config)
    peft_config = None if method == "full" else mp.LoraConfig(r=8, target_modules=["c_attn"], modules_to_save=["score"])
    quantize = mp.NF4Config() if method == "qlora" else None
    if peft_config is not None:
        model = mp.get_peft_model(model, copy.deepcopy(peft_config), quantization=quantize)
    setup = TrainingSetup(ids.shape[0], ids.shape[1], task="seq_cls", quantization=quantize)
    measured, estimate = compare(
        model, config, peft_config, setup, lambda m: m(input_ids=ids, attention_mask=mask, labels=labels).loss
    )
    check(measured, estimate)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fp32_adapters_on_a_16bit_base(dtype):
    """get_peft_model's default on a 16-bit base (peft's autocast_adapter_dtype): the adapters, their gradients and
    optimizer states are fp32. Weights, gradients and states are counted exactly; the activations' recipe
    (activation_memory.py) still counts LoRA's saved input in the base's dtype, so they are not compared here."""
    setup = TrainingSetup(B, T, dtype=dtype)
    model = mp.get_peft_model(tiny_llama().to(getattr(torch, dtype)), lora("llama"))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    measured = measure_training_memory(model, lambda m: m(input_ids=IDS, labels=IDS).loss)
    estimate = estimate_memory(tiny_llama().config, lora("llama"), setup)
    assert (measured.weights, measured.gradients, measured.optimizer) == (
        estimate.weights,
        estimate.gradients,
        estimate.optimizer,
    )
    in_base_dtype = estimate_memory(
        tiny_llama().config, lora("llama"), TrainingSetup(B, T, dtype, adapter_dtype="base")
    )
    assert estimate.gradients == 2 * in_base_dtype.gradients == 4 * estimate.trainable


def test_checkpoint_size_is_the_adapter_file(tmp_path):
    config = lora(targets=["c_attn", "c_fc"])
    model = mp.get_peft_model(tiny_gpt2(), copy.deepcopy(config))
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    estimate = estimate_memory(tiny_gpt2().config, config, TrainingSetup(1, 8))
    assert estimate.checkpoint == stored
    assert 0 < (tmp_path / "adapter_model.safetensors").stat().st_size - stored < 4096  # the JSON header


def test_measure_counts_saved_tensors_once_and_at_the_peak():
    """Two trainable linears with a ReLU between: the first keeps x, the second keeps relu(h),
    which is also what ReLU keeps (one storage). 2 x (4 x 8) fp32 values = 256 bytes."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    x = torch.randn(4, 8)
    report = measure_training_memory(model, lambda m: m(x).sum())
    assert report.activations == 2 * 4 * 8 * 4
    assert (report.weights, report.gradients, report.optimizer) == (4 * 144, 4 * 144, 8 * 144)


# Published shapes: GPT-3 (Brown et al., 2020, Table 2.1) and LLaMA (Touvron et al., 2023, Table 2).
GPT3 = GPT2Config(n_embd=12288, n_layer=96, n_head=96, n_positions=2048)
LLAMA = {
    "7B": LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "13B": LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "65B": LlamaConfig(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64),
}
QLORA = mp.LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear")
# The paper's recipe: bf16 compute and adapters, 32-bit (paged) AdamW states, gradient checkpointing.
QLORA_SETUP = dict(
    dtype="bfloat16", adapter_dtype="base", optimizer_dtype="float32", gradient_checkpointing=True, dropout=True
)


def test_gpt3_lora_figures():
    """LoRA paper (Hu et al., 2022, Sec. 4.2 and Table 4): r=4 on Wq, Wv of GPT-3 175B trains 18.9M
    parameters and the checkpoint shrinks from 350 GB to about 35 MB. GPT-2-class models fuse
    Wq, Wk, Wv in c_attn: r (d + 3d) per layer = 2 r (d + d), the same count. The paper's adapters are fp16
    (adapter_dtype="base"); get_peft_model's default on a 16-bit base, fp32 adapters, doubles the file."""
    config = mp.LoraConfig(r=4, target_modules=["c_attn"])
    estimate = estimate_memory(GPT3, config, TrainingSetup(1, 2048, "float16", adapter_dtype="base"))
    assert estimate.trainable == 96 * 2 * 4 * (12288 + 12288) and abs(estimate.trainable / 18.9e6 - 1) < 0.01
    assert abs(estimate.params / 175e9 - 1) < 0.01
    assert abs(estimate.checkpoint / 2**20 / 35 - 1) < 0.05  # 36.0 MiB (37.7 MB) vs the paper's "35MB"
    fp32_adapters = estimate_memory(GPT3, config, TrainingSetup(1, 2048, "float16"))
    assert fp32_adapters.checkpoint == 2 * estimate.checkpoint == fp32_adapters.gradients
    full = estimate_memory(GPT3, None, TrainingSetup(1, 2048, "float16"))
    assert abs(full.checkpoint / 350e9 - 1) < 0.01


@pytest.mark.parametrize("size,billions", [("7B", 6.7), ("13B", 13.0), ("65B", 65.2)])
def test_llama_parameter_counts(size, billions):
    estimate = estimate_memory(LLAMA[size], None, TrainingSetup(1, 1))
    assert abs(estimate.params / (billions * 1e9) - 1) < 0.01


def test_qlora_65b_fits_in_48gb_and_16bit_does_not():
    """QLoRA paper (Dettmers et al., 2023): finetuning a 65B model needs more than 780 GB in 16 bits
    and fits a single 48 GB GPU with QLoRA (r=64 on every linear, NF4 with double quantization,
    bf16 compute, 32-bit paged AdamW, gradient checkpointing; batch 1, 512 tokens)."""
    nf4 = mp.NF4Config(target_modules="all-linear")
    qlora = estimate_memory(LLAMA["65B"], QLORA, TrainingSetup(1, 512, quantization=nf4, **QLORA_SETUP))
    assert qlora.total < 48e9
    assert estimate_memory(LLAMA["65B"], QLORA, TrainingSetup(1, 512, **QLORA_SETUP)).total > 2 * 48e9
    full = estimate_memory(LLAMA["65B"], None, TrainingSetup(1, 512, **QLORA_SETUP))
    assert 780e9 < full.weights + full.gradients + full.optimizer < 800e9


def test_175b_estimates_without_allocating_weights(monkeypatch):
    """What makes a 175B estimate fast and small: the model and its adapters live on the meta device (shapes
    and dtypes, no storage). The speed itself is not asserted here (it would fail on a loaded machine)."""
    built = []
    monkeypatch.setattr(mp.memory, "build_meta_model", lambda *a: built.append(build_meta_model(*a)) or built[-1])
    monkeypatch.setattr(mp.memory, "_COUNTED", OrderedDict())  # nothing built before this test
    estimate = estimate_memory(GPT3, mp.LoraConfig(r=4, target_modules=["c_attn"]), TrainingSetup(8, 2048, "bfloat16"))
    assert estimate.params > 174e9
    assert all(t.is_meta for t in [*built[0].parameters(), *built[0].buffers()])


def test_a_sweep_builds_each_model_once_and_matches_fresh_estimates(monkeypatch):
    """Batch, sequence length, optimizer and checkpointing do not change the built model: a sweep over them reuses it.
    The model's config, the PEFT config (also when edited in place), the dtype or the quantization do: the model is
    built again. A reused model gives exactly the numbers a fresh build gives."""
    builds = []
    monkeypatch.setattr(mp.memory, "build_meta_model", lambda *a: builds.append(a) or build_meta_model(*a))
    monkeypatch.setattr(mp.memory, "_COUNTED", OrderedDict())

    def fresh(*args):
        mp.memory._COUNTED.clear()
        return estimate_memory(*args)

    config, peft_config = tiny_llama().config, lora("llama")
    estimate_memory(config, peft_config, TrainingSetup(2, 16))
    sweep = [TrainingSetup(4, 64), TrainingSetup(2, 16, optimizer="sgd", gradient_checkpointing=True, dropout=True)]
    reused = [estimate_memory(config, peft_config, setup) for setup in sweep]
    assert len(builds) == 1
    assert reused == [fresh(config, peft_config, setup) for setup in sweep] and len(builds) == 3
    assert reused[0].activations != reused[1].activations  # the sweep does change the estimate

    changed = {
        "model config": (tiny_llama(num_hidden_layers=3).config, peft_config, TrainingSetup(2, 16)),
        "PEFT config": (config, mp.LoraConfig(r=8, target_modules=TARGETS["llama"]), TrainingSetup(2, 16)),
        "dtype": (config, peft_config, TrainingSetup(2, 16, dtype="bfloat16")),
        "quantization": (config, peft_config, TrainingSetup(2, 16, quantization=mp.NF4Config())),
    }
    for name, args in changed.items():
        before = len(builds)
        assert estimate_memory(*args) == fresh(*args), name
        assert len(builds) == before + 2, name  # built for the change, then again by fresh()
    estimate_memory(config, peft_config, TrainingSetup(2, 16))
    peft_config.r = 2  # edited in place: the same object, another model
    before = len(builds)
    assert estimate_memory(config, peft_config, TrainingSetup(2, 16)).trainable < reused[0].trainable
    assert len(builds) == before + 1
    assert len(mp.memory._COUNTED) <= mp.memory._COUNTED_SIZE


def test_bad_input():
    with pytest.raises(ValueError, match=r"missing \['num_hidden_layers', 'intermediate_size'\]"):
        estimate_memory(
            {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 99},
            None,
            TrainingSetup(1, 8),
        )
    with pytest.raises(ValueError, match=r"model_type='bert'.*knows \['gpt2', 'llama'"):
        estimate_memory(mp.models.tiny_bert().config, None, TrainingSetup(1, 8))
    with pytest.raises(TypeError, match="needs a TrainingSetup"):
        estimate_memory(GPT3, None)
    with pytest.raises(TypeError, match="TrainingSetup.dtype must be"):
        TrainingSetup(1, 8, dtype="fp8")
    with pytest.raises(ValueError, match="batch_size and seq_len must be >= 1"):
        TrainingSetup(0, 8)
    with pytest.raises(ValueError, match="quantization needs a PEFT config"):
        estimate_memory(GPT3, None, TrainingSetup(1, 8, quantization=mp.NF4Config()))
