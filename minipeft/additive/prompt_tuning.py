"""Prompt tuning (Lester, Al-Rfou & Constant, 2021, "The Power of Scale for Parameter-Efficient
Prompt Tuning", arXiv:2104.08691). Taught in chapter 04.

n trainable embeddings P (n, d) are prepended to the embedded input; nothing else changes:

    h_0 = [P ; E x]   (B, n + T, d)

n d parameters in all, independent of depth. The paper initialises P from random values,
from embeddings of sampled vocabulary, or from the embeddings of a text (e.g. the class
names), and finds the method matches full fine-tuning only for models of ~10B parameters.
The machinery (virtual-token ids, the wrapped embedding) is in prompts.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..core.config import register
from .prompts import PromptLayer, PromptLearningConfig, PromptMethod, PromptTable


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    peft_type = "PROMPT_TUNING"
    # "RANDOM": normal with the vocabulary embeddings' std; "SAMPLE_VOCAB": rows of random
    # vocabulary tokens; "TEXT": the embeddings of prompt_tuning_init_text, repeated to n tokens.
    prompt_tuning_init: Literal["RANDOM", "SAMPLE_VOCAB", "TEXT"] = "RANDOM"
    # The text for "TEXT" init, e.g. a description of the task.
    prompt_tuning_init_text: str | None = None
    # Where to load the tokenizer for "TEXT" init from (a local directory, offline).
    tokenizer_name_or_path: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prompt_tuning_init == "TEXT" and not (self.prompt_tuning_init_text and self.tokenizer_name_or_path):
            raise ValueError(
                'prompt_tuning_init="TEXT" needs prompt_tuning_init_text and tokenizer_name_or_path '
                "(the tokenizer that turns the text into ids of this model's vocabulary)"
            )


def initial_prompt(config: PromptTuningConfig, vocab: torch.Tensor) -> torch.Tensor:
    """(n, d) starting values for the prompt, from the vocabulary embeddings `vocab` (V, d)."""
    n = config.num_virtual_tokens
    if config.prompt_tuning_init == "RANDOM":
        return torch.randn(n, vocab.shape[1], dtype=vocab.dtype, device=vocab.device) * vocab.std()
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        return vocab[torch.randint(0, vocab.shape[0], (n,), device=vocab.device)].clone()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path)
    ids = tokenizer(config.prompt_tuning_init_text, add_special_tokens=False)["input_ids"]
    if not ids or max(ids) >= vocab.shape[0]:
        raise ValueError(
            f"prompt_tuning_init_text gives token ids {ids[:8]}..., which do not fit this model's vocabulary of "
            f"{vocab.shape[0]}; use the model's own tokenizer"
        )
    ids = (ids * (n // len(ids) + 1))[:n]  # repeat the text until it fills n tokens
    return vocab[torch.tensor(ids, device=vocab.device)].clone()


class PromptTuningMethod(PromptMethod):
    def build_encoder(self, config: PromptTuningConfig, embedding: PromptLayer) -> nn.Module:
        vocab = embedding.weight.detach()  # (V, d)
        if config.inference_mode:  # loading a saved prompt: its values come from the file
            return PromptTable(vocab.new_zeros(config.num_virtual_tokens, vocab.shape[1]))
        return PromptTable(initial_prompt(config, vocab))


PROMPT_TUNING = register(PromptTuningMethod(PromptTuningConfig, PromptLayer))
