"""The additive methods HF peft also has (prompt tuning, P-tuning, prefix tuning, (IA)^3),
against peft as the independent reference: equal trainable counts for the same settings,
equal outputs (and greedy generations) once both hold the same weights, and (IA)^3 adapter
files readable both ways. On tiny GPT-2 (Conv1D), LLaMA-style (grouped-query attention)
and BERT-style models."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch

import minipeft as mp
from tests.cases import MODELS

IDS = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(1))
MASK = torch.tensor([[1] * 10, [1] * 7 + [0] * 3])  # the second row is right-padded
TASK = {"gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "bert": "FEATURE_EXTRACTION"}
# name -> (minipeft config, peft config given a task type), the same settings on both sides
PAIRS = {
    "prompt": (
        lambda: mp.PromptTuningConfig(num_virtual_tokens=5),
        lambda t: peft.PromptTuningConfig(task_type=t, num_virtual_tokens=5),
    ),
    "p_tuning_mlp": (
        lambda: mp.PTuningConfig(num_virtual_tokens=4, encoder_hidden_size=24),
        lambda t: peft.PromptEncoderConfig(task_type=t, num_virtual_tokens=4, encoder_hidden_size=24),
    ),
    "p_tuning_lstm": (
        lambda: mp.PTuningConfig(num_virtual_tokens=4, encoder_reparameterization_type="LSTM", encoder_hidden_size=24),
        lambda t: peft.PromptEncoderConfig(
            task_type=t, num_virtual_tokens=4, encoder_reparameterization_type="LSTM", encoder_hidden_size=24
        ),
    ),
    "prefix_mlp": (
        lambda: mp.PrefixTuningConfig(num_virtual_tokens=6, encoder_hidden_size=40),
        lambda t: peft.PrefixTuningConfig(
            task_type=t, num_virtual_tokens=6, prefix_projection=True, encoder_hidden_size=40
        ),
    ),
    "prefix": (
        lambda: mp.PrefixTuningConfig(num_virtual_tokens=6, prefix_projection=False),
        lambda t: peft.PrefixTuningConfig(task_type=t, num_virtual_tokens=6),
    ),
}


def both(name: str, kind: str):
    ours = mp.get_peft_model(MODELS[kind](), PAIRS[name][0]())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(MODELS[kind](), PAIRS[name][1](TASK[kind]))
    return ours, theirs


def copy_trainables(ours, theirs) -> None:
    """peft's prompt encoders hold the same tensors in the same order (names differ)."""
    mine = [p for p in ours.parameters() if p.requires_grad]
    other = [p for p in theirs.parameters() if p.requires_grad]
    assert [p.shape for p in mine] == [p.shape for p in other]
    with torch.no_grad():
        for a, b in zip(mine, other, strict=True):
            a.copy_(torch.randn_like(b) if a.dim() == 1 else b)  # random biases too, so they matter
            b.copy_(a)


def out(model, **kw):
    o = model(input_ids=IDS, attention_mask=MASK, **kw)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("name", sorted(PAIRS))
def test_counts_and_outputs_equal_peft(name, kind):
    ours, theirs = both(name, kind)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    copy_trainables(ours, theirs)
    with torch.no_grad():
        torch.testing.assert_close(out(ours), out(theirs), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("name", ["prompt", "p_tuning_lstm", "prefix_mlp"])
def test_greedy_generation_equals_peft(name, kind):
    ours, theirs = both(name, kind)
    copy_trainables(ours, theirs)
    args = dict(input_ids=IDS[:, :6], attention_mask=torch.ones(2, 6, dtype=torch.long), max_new_tokens=6)
    ours_ids = ours.generate(**args, do_sample=False, pad_token_id=0)
    theirs_ids = theirs.generate(**args, do_sample=False, pad_token_id=0)
    assert torch.equal(ours_ids, theirs_ids)
    assert torch.equal(ours_ids[:, :6], IDS[:, :6]), "the result starts with the caller's ids"


def ia3_configs(kind: str):
    targets = {"gpt2": ["c_attn", "mlp.c_proj"], "llama": ["k_proj", "v_proj", "down_proj"]}[kind]
    ff = targets[-1:]
    return (
        mp.IA3Config(target_modules=targets, feedforward_modules=ff, init_ia3_weights=False),
        peft.IA3Config(target_modules=targets, feedforward_modules=ff),
    )


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_ia3_counts_outputs_and_files_equal_peft(kind, tmp_path):
    ours_cfg, theirs_cfg = ia3_configs(kind)
    ours = mp.get_peft_model(MODELS[kind](), ours_cfg)
    theirs = peft.get_peft_model(MODELS[kind](), theirs_cfg)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ours.save_pretrained(tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(MODELS[kind](), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(out(loaded), out(ours), rtol=0, atol=1e-6)
        for p in theirs.parameters():
            if p.requires_grad:
                p.mul_(torch.rand_like(p) + 0.5)
    theirs.save_pretrained(tmp_path / "theirs")
    back = mp.PeftModel.from_pretrained(MODELS[kind](), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(out(back), out(theirs), rtol=0, atol=1e-6)
        assert not torch.allclose(out(back), out(MODELS[kind]())), "the peft adapter must change the outputs"


# peft's LN tuning has no default norms for BERT: both sides name them
NORMS = {"CAUSAL_LM": None, "FEATURE_EXTRACTION": ["LayerNorm"]}
FILE_PAIRS = {
    **PAIRS,
    "ln_tuning": (
        lambda t: mp.LNTuningConfig(init_weights=False, target_modules=NORMS[t]),
        lambda t: peft.LNTuningConfig(task_type=t, target_modules=NORMS[t]),
    ),
}


def perturb(model) -> None:
    """Trained-looking values: every trainable tensor scaled and shifted at random (so that it matters)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(torch.rand_like(p) + 0.5).add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("name", sorted(FILE_PAIRS))
def test_files_load_both_ways(name, kind, tmp_path):
    """Prompt, prefix, P-tuning and LN-tuning files: ours load in peft, peft's load here, same outputs. A prompt
    is stored as peft stores it (the table its encoder computes, `prompt_embeddings`) and loads folded."""
    ours_cfg = FILE_PAIRS[name][0](TASK[kind]) if name == "ln_tuning" else FILE_PAIRS[name][0]()
    theirs_cfg = FILE_PAIRS[name][1](TASK[kind])
    torch.manual_seed(0)
    ours = mp.get_peft_model(MODELS[kind](), ours_cfg).eval()
    perturb(ours)
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_peft = peft.PeftModel.from_pretrained(MODELS[kind](), tmp_path / "ours").eval()
        theirs = peft.get_peft_model(MODELS[kind](), theirs_cfg).eval()
    perturb(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    in_ours = mp.PeftModel.from_pretrained(MODELS[kind](), tmp_path / "theirs")
    with torch.no_grad():
        if name != "ln_tuning":  # filled in from the model's class: without it peft would skip the prompt
            assert ours.peft_config["default"].task_type == TASK[kind]
        torch.testing.assert_close(out(in_peft), out(ours), rtol=0, atol=1e-5)
        torch.testing.assert_close(out(in_ours), out(theirs), rtol=0, atol=1e-5)
        real = slice(-IDS.shape[1], None)  # the caller's positions (a prompt adds its own in front)
        assert not torch.allclose(out(in_ours)[:, real], out(MODELS[kind]()), atol=1e-3), "the adapter must matter"
        again = mp.PeftModel.from_pretrained(MODELS[kind](), tmp_path / "ours")  # our own file, read back
        torch.testing.assert_close(out(again), out(ours), rtol=0, atol=1e-5)
