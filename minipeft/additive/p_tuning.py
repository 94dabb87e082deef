"""P-tuning (Liu, Zheng, Du, Ding, Qian, Yang & Tang, 2021, "GPT Understands, Too",
arXiv:2103.10385). Taught in chapter 04.

Like prompt tuning, n virtual token embeddings are prepended to the input; unlike it, they
are not free parameters but the output of a small *prompt encoder* applied to n trainable
input vectors e_1..e_n (n, d):

    LSTM: [p_1..p_n] = MLP(BiLSTM(e_1..e_n))     (the paper's encoder: tokens see each other)
    MLP:  p_i = MLP(e_i)                          (a cheaper variant, HF peft's default)

The reparameterisation eases optimisation; after training the prompts are a constant table,
so `fold_prompt_encoder` replaces the encoder by that table (a prompt-tuning adapter).
Module shapes follow HF peft's PromptEncoder so trainable counts can be compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..core.config import register
from .prompt_tuning import PromptTuningConfig
from .prompts import PromptLayer, PromptLearningConfig, PromptMethod


@dataclass
class PTuningConfig(PromptLearningConfig):
    peft_type = "P_TUNING"
    # The prompt encoder: "MLP" (3 linear layers) or "LSTM" (bidirectional LSTM + 2-layer MLP head, the paper's).
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = "MLP"
    # Hidden width h of the encoder; None: the model width d (peft's default).
    encoder_hidden_size: int | None = None
    # LSTM layers (the MLP always has 3 linears); 2 as in peft.
    encoder_num_layers: int = 2
    # Dropout between LSTM layers; 0 = off.
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise ValueError(f"PTuningConfig.encoder_hidden_size must be >= 1, got {self.encoder_hidden_size}")
        if self.encoder_num_layers < 1:
            raise ValueError(f"PTuningConfig.encoder_num_layers must be >= 1, got {self.encoder_num_layers}")

    def folded(self) -> PromptTuningConfig:
        return PromptTuningConfig(
            num_virtual_tokens=self.num_virtual_tokens,
            modules_to_save=self.modules_to_save,
            base_model_name_or_path=self.base_model_name_or_path,
            task_type=self.task_type,
            inference_mode=self.inference_mode,
        )


class PromptEncoder(nn.Module):
    """forward() -> the n virtual token embeddings (n, d)."""

    def __init__(self, config: PTuningConfig, d: int, like: torch.Tensor) -> None:
        super().__init__()
        n, h = config.num_virtual_tokens, config.encoder_hidden_size or d
        kw = dict(device=like.device, dtype=like.dtype)
        self.embedding = nn.Parameter(torch.randn(n, d, **kw))  # (n, d): the encoder's input e_1..e_n
        if config.encoder_reparameterization_type == "LSTM":
            self.lstm = nn.LSTM(
                d,
                h,
                config.encoder_num_layers,
                dropout=config.encoder_dropout,
                bidirectional=True,
                batch_first=True,
                **kw,
            )
            self.head = nn.Sequential(nn.Linear(2 * h, 2 * h, **kw), nn.ReLU(), nn.Linear(2 * h, d, **kw))
        else:
            self.lstm = None
            self.head = nn.Sequential(
                nn.Linear(d, h, **kw), nn.ReLU(), nn.Linear(h, h, **kw), nn.ReLU(), nn.Linear(h, d, **kw)
            )

    def forward(self) -> torch.Tensor:
        x = self.embedding  # (n, d)
        if self.lstm is not None:
            x = self.lstm(x[None])[0][0]  # (1, n, d) -> (n, 2h): each token sees the whole prompt
        return self.head(x)  # (n, d)


class PTuningMethod(PromptMethod):
    def build_encoder(self, config: PTuningConfig, embedding: PromptLayer) -> nn.Module:
        return PromptEncoder(config, config.token_dim, embedding.weight)


P_TUNING = register(PTuningMethod(PTuningConfig, PromptLayer))
