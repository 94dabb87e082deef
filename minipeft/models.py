"""The testbed models: a pretrained tiny GPT shipped with the package (`tiny` scale),
hub checkpoints (`full` scale), and tiny GPT-2 / LLaMA / BERT-style models built from
configs for the tests. Introduced in chapter 00.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.utils import logging as hf_logging

from .data import scale

# The pretrained testbed (model + tokenizer) that scripts/pretrain_testbed.py wrote.
TESTBED_DIR = Path(__file__).parent / "assets" / "testbed-gpt"
# `full` scale: GPT-2 small (124M) from the hub, on Colab.
FULL_BASE = "openai-community/gpt2"


@contextmanager
def _quiet():
    """Hide transformers' load-time chatter: the new head's "newly initialized" notice is
    expected here, and progress bars would clutter every chapter."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def testbed_tokenizer():
    """The testbed's byte-level BPE tokenizer (4096 tokens; 0 pads, 1 ends a text)."""
    return AutoTokenizer.from_pretrained(TESTBED_DIR)


def load_testbed() -> GPT2LMHeadModel:
    """The pretrained testbed as a language model."""
    with _quiet():
        return GPT2LMHeadModel.from_pretrained(TESTBED_DIR)


def load_classifier(num_labels: int, name_or_path: str | os.PathLike | None = None, seed: int = 0):
    """(model, tokenizer) for sequence classification; the head (`score`) is new, seeded by `seed`.

    Default source by scale: `tiny`, the testbed shipped in the package; `full`, GPT-2 small
    from the hub. Any local directory works too: both go through the same from_pretrained."""
    if name_or_path is None:
        name_or_path = TESTBED_DIR if scale() == "tiny" else FULL_BASE
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:  # GPT-2 has none; its end-of-text token serves
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(seed)
    with _quiet():
        model = AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=num_labels)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def tiny_gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    """A random 2-layer GPT-2 (Conv1D layers) for tests."""
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(GPT2Config(**{**cfg, **overrides})).eval()


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random 2-layer LLaMA-style model (RMSNorm, SwiGLU, rotary, bias-free linears)."""
    torch.manual_seed(seed)
    cfg = dict(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **overrides})).eval()


def tiny_bert(seed: int = 0, **overrides) -> BertModel:
    """A random 2-layer BERT-style encoder."""
    torch.manual_seed(seed)
    cfg = dict(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        vocab_size=256,
        max_position_embeddings=64,
    )
    return BertModel(BertConfig(**{**cfg, **overrides})).eval()
