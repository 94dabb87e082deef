"""Instruction tuning (chapter 13's library part): the loss covers the answer tokens only (checked against a
hand computation), gradient accumulation equals one large batch, greedy generation with the KV cache equals
one full forward per token, and equals HF peft token for token (LoRA, prefix tuning, prompt tuning, (IA)^3)
with the same weights; bad input is refused before anything changes; a short run lowers the masked loss."""

from __future__ import annotations

import dataclasses
import math
import warnings

import peft
import pytest
import torch
from torch.nn import functional as F

import minipeft as mp
from minipeft.data import TOPICS, Example, InstructionData, PromptTemplate, stdlib_instructions, tokenize_instructions
from minipeft.models import load_testbed, tiny_gpt2
from minipeft.models import testbed_tokenizer as load_tokenizer  # (not collected as a test)
from minipeft.train import (
    CausalLMConfig,
    bits_per_byte,
    evaluate_generation,
    evaluate_loss,
    greedy_generate,
    masked_lm_loss,
    train_causal_lm,
)
from tests.test_additive_vs_peft import copy_trainables, perturb

TOK = load_tokenizer()
EXAMPLES = [
    Example("Name the function", "Return the absolute path.", "abspath"),
    Example("Describe", "def join(a, *p)", "Join two or more pathname components."),
    Example("Name the function", "Test whether a path exists.", "exists"),
]


def small_data() -> InstructionData:
    """A sample of the standard-library pairs (a few hundred: parsing the whole library takes seconds)."""
    return stdlib_instructions(max_train=300, max_eval=60, heldout_chars=3000)


def test_stdlib_pairs_are_split_by_package_and_fit_the_context():
    data = small_data()
    train_sources, eval_sources = {e.source for e in data.train}, {e.source for e in data.eval}
    assert eval_sources <= set(TOPICS) and not train_sources & set(TOPICS), "eval packages were never trained on"
    assert len(data.train) == 300 and len(data.eval) == 60 and len(train_sources) >= 8
    assert {e.instruction for e in data.train} == {"Name the function", "Describe"}
    assert not {(e.input, e.answer) for e in data.train} & {(e.input, e.answer) for e in data.eval}
    tokenize_instructions(data.train + data.eval, data.template, TOK, max_length=53)  # refuses a pair that does not fit
    assert sum(map(len, data.heldout_text)) == 3000


def test_labels_cover_the_answer_and_end_of_text_only():
    ids, mask, labels = tokenize_instructions(EXAMPLES, PromptTemplate(), TOK, max_length=40).tensors
    for row, e in enumerate(EXAMPLES):
        prompt = TOK(PromptTemplate().prompt(e))["input_ids"]
        answer = TOK(e.answer)["input_ids"] + [TOK.eos_token_id]
        n = len(prompt) + len(answer)
        assert ids[row, :n].tolist() == prompt + answer and mask[row].tolist() == [1] * n + [0] * (40 - n)
        assert labels[row].tolist() == [-100] * len(prompt) + answer + [-100] * (40 - n)
        assert TOK.decode(prompt) == f"{e.instruction}: {e.input}\n"


def test_masked_loss_equals_a_hand_computation():
    """Each pair alone and unpadded: cross-entropy of the answer tokens given everything before them."""
    model = load_testbed()  # pretrained: its loss on the prompts differs from its loss on the answers
    ids, mask, labels = tokenize_instructions(EXAMPLES, PromptTemplate(), TOK, max_length=40).tensors
    losses, count = [], 0
    for e in EXAMPLES:
        prompt = TOK(PromptTemplate().prompt(e))["input_ids"]
        answer = TOK(e.answer)["input_ids"] + [TOK.eos_token_id]
        logits = model(input_ids=torch.tensor([prompt + answer])).logits[0]  # (n, V)
        predict = logits[len(prompt) - 1 : -1]  # the positions whose next token is an answer token
        losses.append(F.cross_entropy(predict, torch.tensor(answer), reduction="sum"))
        count += len(answer)
    hand = torch.stack(losses).sum() / count
    with torch.no_grad():
        torch.testing.assert_close(masked_lm_loss(model, ids, mask, labels), hand, rtol=1e-5, atol=1e-6)
        unmasked = masked_lm_loss(model, ids, mask, ids.masked_fill(mask == 0, -100))
    assert not torch.isclose(unmasked, hand, rtol=0.05), "with the prompt in the loss it would differ"


def test_unmasked_training_scores_every_real_token():
    """mask_prompt=False (chapter 13's comparison): the first step's loss is the mean over every real token after
    the first, prompt included, computed by hand pair by pair; the default scores the answers only."""
    data = InstructionData(EXAMPLES, EXAMPLES, PromptTemplate(), [])
    losses = {}
    for mask_prompt in (True, False):
        model = mp.get_peft_model(load_testbed(), mp.LoraConfig(r=2))  # B = 0: the first loss is the base model's
        config = CausalLMConfig(steps=1, batch_size=3, lr=1e-3, progress=False, mask_prompt=mask_prompt)
        losses[mask_prompt] = train_causal_lm(model, data, TOK, config).train_loss[0]
    base, total, count = load_testbed(), 0.0, 0
    with torch.no_grad():
        for e in EXAMPLES:
            ids = TOK(PromptTemplate().prompt(e))["input_ids"] + TOK(e.answer)["input_ids"] + [TOK.eos_token_id]
            logits = base(input_ids=torch.tensor([ids])).logits[0]  # (n, V)
            total += F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").item()
            count += len(ids) - 1
    assert losses[False] == pytest.approx(total / count, rel=1e-5)
    assert losses[True] != pytest.approx(losses[False], rel=0.05)


def test_a_mixed_generation_batch_equals_each_row_alone():
    """greedy_generate(adapter_names=...): every row continues with its own adapter, cached or not."""
    torch.manual_seed(0)
    model = mp.get_peft_model(load_testbed(), PAIRS["lora"][0](), adapter_name="a")
    model.add_adapter("b", PAIRS["lora"][0]())
    perturb(model)
    model.eval()
    routes = ["a", "b", "a"]
    alone = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        alone[name] = greedy_generate(model, IDS, max_new_tokens=10, eos_token_id=1)
    assert alone["a"] != alone["b"], "the two adapters must generate differently for the test to see the routing"
    expected = [alone[name][row] for row, name in enumerate(routes)]
    for use_cache in (True, False):
        assert greedy_generate(model, IDS, 10, 1, use_cache=use_cache, adapter_names=routes) == expected


def test_gradient_accumulation_equals_one_large_batch():
    data = InstructionData(EXAMPLES * 3, EXAMPLES, PromptTemplate(), [])
    after = []
    for batch, accumulate in ((8, 1), (4, 2)):
        base = tiny_gpt2(vocab_size=len(TOK), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout
        model = mp.get_peft_model(base, mp.LoraConfig(r=2, init_lora_weights=False))
        config = CausalLMConfig(steps=1, batch_size=batch, grad_accumulation=accumulate, progress=False, lr=1e-3)
        history = train_causal_lm(model, data, TOK, config)
        after.append((history.train_loss[0], [p.detach().clone() for p in model.parameters() if p.requires_grad]))
    assert after[0][0] == pytest.approx(after[1][0], rel=1e-5)
    for a, b in zip(after[0][1], after[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# Three real prompts cut to one length (7 tokens): the pretrained testbed continues them in varied ways.
PROMPTS = ["def read(self, size=-1):", "Return the absolute path of the given file", "import os\nimport sys\nimport re"]
IDS = torch.tensor([TOK(text)["input_ids"][:7] for text in PROMPTS])  # (3, 7)
# name -> (minipeft config, peft config): the same settings on both sides, on the testbed (GPT-2, Conv1D)
PAIRS = {
    "lora": (
        lambda: mp.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], init_lora_weights=False),
        lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], init_lora_weights=False),
    ),
    "prefix": (
        lambda: mp.PrefixTuningConfig(num_virtual_tokens=5, prefix_projection=False),
        lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
    ),
    "prompt": (
        lambda: mp.PromptTuningConfig(num_virtual_tokens=5),
        lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
    ),
    "ia3": (
        lambda: mp.IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]),
        lambda: peft.IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]),
    ),
}


def trained_looking(name: str):
    """(ours, peft's) on the pretrained testbed, holding the same random, trained-looking adapter weights."""
    torch.manual_seed(0)
    ours = mp.get_peft_model(load_testbed(), PAIRS[name][0]())
    perturb(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(load_testbed(), PAIRS[name][1]())
    copy_trainables(theirs, ours)  # peft's tensors take ours (same shapes, same order)
    return ours.eval(), theirs.eval()


@pytest.mark.parametrize("name", [*PAIRS, "full"])
def test_generation_with_the_cache_equals_one_forward_per_token(name):
    model = load_testbed() if name == "full" else trained_looking(name)[0]
    cached = greedy_generate(model, IDS, max_new_tokens=10, eos_token_id=1)
    plain = greedy_generate(model, IDS, max_new_tokens=10, eos_token_id=1, use_cache=False)
    assert cached == plain and all(len(row) >= 2 for row in cached)
    if name != "full":
        with model.disable_adapter():
            base = greedy_generate(model, IDS, max_new_tokens=10, eos_token_id=1)
        assert base != cached, "the adapter must change what is generated"


@pytest.mark.parametrize("name", PAIRS)
def test_greedy_generation_equals_peft_token_for_token(name):
    ours, theirs = trained_looking(name)
    mine = greedy_generate(ours, IDS, max_new_tokens=12, eos_token_id=1)
    args = dict(max_new_tokens=12, do_sample=False, eos_token_id=1, pad_token_id=1)
    with torch.no_grad():
        out = theirs.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), **args)[:, IDS.shape[1] :]
    other = [row[: row.index(1) + 1] if 1 in row else row for row in out.tolist()]
    assert mine == other


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match=r"PromptTemplate.text.*\{answer\}.*e\.g\. '\{instruction\}: \{input\}"):
        PromptTemplate("{instruction}: {input}\n")
    with pytest.raises(ValueError, match="end with the one"):
        PromptTemplate("{answer} is the answer to {input}")
    with pytest.raises(ValueError, match=r"Example.answer must be non-empty.*'  '"):
        Example("Name the function", "Return the path.", "  ")
    long = Example("Describe", "def f(" + ", ".join(f"a{i}" for i in range(30)) + ")", "Do it.")
    with pytest.raises(ValueError, match=r"example 1 .*= \d+, more than max_length=40"):
        tokenize_instructions([EXAMPLES[0], long], PromptTemplate(), TOK, max_length=40)


def test_a_pair_that_leaves_no_room_for_virtual_tokens_is_refused_before_training():
    data = InstructionData(EXAMPLES, EXAMPLES, PromptTemplate(), [])
    model = mp.get_peft_model(load_testbed(), mp.PromptTuningConfig(num_virtual_tokens=50))  # 14 positions left
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="more than max_length=14"):
        train_causal_lm(model, data, TOK, CausalLMConfig(steps=2, progress=False))
    with pytest.raises(ValueError, match="example 1: its prompt has 14 tokens, but the model has 14 positions"):
        evaluate_generation(model, data, TOK)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    plain = load_testbed()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    for bad, message in ((0, "grad_accumulation must be an integer >= 1, got 0"), (9, "need at least 25 training")):
        with pytest.raises(ValueError, match=message):
            train_causal_lm(plain, data, TOK, CausalLMConfig(steps=2, batch_size=3, grad_accumulation=bad))
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in before.items())


def test_bits_per_byte_equals_a_hand_computation():
    model = load_testbed()
    text = "def read(self, size=-1):\n    return self._read(size)\n"
    ids = TOK(text)["input_ids"]
    assert 2 < len(ids) <= 64, "one window"
    with torch.no_grad():
        nats = F.cross_entropy(
            model(input_ids=torch.tensor([ids])).logits[0, :-1], torch.tensor(ids[1:]), reduction="sum"
        )
    expected = nats.item() / math.log(2) / len(TOK.decode(ids[1:]).encode())
    assert bits_per_byte(model, TOK, [text]) == pytest.approx(expected, rel=1e-5)


def test_a_short_lora_run_lowers_the_masked_loss_and_generates():
    data = small_data()
    data = dataclasses.replace(data, eval=data.eval[:12])
    model = mp.get_peft_model(load_testbed(), mp.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_fc"]))
    eval_set = tokenize_instructions(data.eval, data.template, TOK, 64)
    before = evaluate_loss(model, eval_set)
    history = train_causal_lm(model, data, TOK, CausalLMConfig(steps=30, batch_size=16, eval_every=15, progress=False))
    assert history.eval_loss[-1] < 0.8 * before, (before, history.eval_loss)
    result = evaluate_generation(model, data, TOK, max_new_tokens=12)
    with model.disable_adapter():
        base = evaluate_generation(model, data, TOK, max_new_tokens=12)
    assert len(result.predictions) == 12 and 0.0 <= result.exact_match <= 1.0
    assert result.similarity > base.similarity, (result.similarity, base.similarity)
    assert base.bits_per_byte == pytest.approx(bits_per_byte(load_testbed(), TOK, data.heldout_text), rel=1e-5)


# The other methods that run on a causal LM (LoRA, prefix, prompt tuning and (IA)^3 are above), and full FT.
OTHERS = {
    "p_tuning": lambda: mp.PTuningConfig(num_virtual_tokens=4, encoder_hidden_size=32),
    "bitfit": lambda: mp.BitFitConfig(),
    "ln_tuning": lambda: mp.LNTuningConfig(),
    "adapter": lambda: mp.AdapterConfig(),
    "dora": lambda: mp.LoraConfig(r=2, use_dora=True),
    "loha": lambda: mp.LoHaConfig(r=2, target_modules=["c_attn"]),
    "vera": lambda: mp.VeraConfig(r=16, target_modules=["c_attn"]),
    "mam": lambda: mp.MAMConfig(num_virtual_tokens=4, prefix_projection=False, encoder_hidden_size=None),
    "unipelt": lambda: mp.UniPELTConfig(r=2, num_virtual_tokens=4, prefix_projection=False, encoder_hidden_size=None),
    "compacter": lambda: mp.CompacterConfig(bottleneck_size=16, phm_dim=4),
}


@pytest.mark.parametrize("name", [*OTHERS, "full"])
def test_every_causal_lm_method_trains_and_generates(name):
    data = InstructionData(EXAMPLES * 4, EXAMPLES, PromptTemplate(), ["def f(x):\n    return x + 1\n"])
    model = load_testbed() if name == "full" else mp.get_peft_model(load_testbed(), OTHERS[name]())
    trainable = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    history = train_causal_lm(model, data, TOK, CausalLMConfig(steps=3, batch_size=4, lr=1e-2, progress=False))
    assert history.trainable == sum(p.numel() for p in trainable.values()) and math.isfinite(history.eval_loss[-1])
    params = dict(model.named_parameters())
    assert all(not torch.equal(params[k], v) for k, v in trainable.items() if v.numel() > 1), "every tensor trained"
    assert greedy_generate(model, IDS, 8, eos_token_id=1) == greedy_generate(model, IDS, 8, 1, use_cache=False)
    result = evaluate_generation(model, data, TOK, max_new_tokens=8)
    assert len(result.predictions) == 3 and result.bits_per_byte > 0
