"""Prefix tuning (Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
Generation", arXiv:2101.00190). Taught in chapter 04.

Every attention layer l gets n trainable key and value vectors, prepended to the keys and
values its tokens attend to:

    head_l(x) = softmax(q [P_k^l ; K]^T / sqrt(d_h)) [P_v^l ; V]     P_k^l, P_v^l: (n, d_kv)

That is exactly a key/value cache of n positions, so the prefix is handed to the model as
`past_key_values`: the transformers 5 attention code of GPT-2, LLaMA and BERT then does the
rest, generation included. Optimising P directly is unstable, so the paper trains it through
an MLP, P = MLP(P') with P' (n, d_kv); after training P is a constant and the MLP is dropped
(`fold_prompt_encoder`). Cost: n * L * 2 * d_kv parameters after folding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from ..core.architectures import kv_shape
from ..core.config import register
from .prompts import PromptLayer, PromptLearningConfig, PromptMethod, PromptTable, check_length, extend_for_prefix


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    peft_type = "PREFIX_TUNING"
    # Train through the MLP reparameterisation P = MLP(P') (the paper's recipe); False: P is the parameter.
    prefix_projection: bool = True
    # Hidden width of that MLP; None: d_kv (peft's default). The paper uses 512-800 on GPT-2 medium.
    encoder_hidden_size: int | None = None

    def folded(self) -> PrefixTuningConfig:
        return dataclasses.replace(self, prefix_projection=False)


class PrefixEncoder(nn.Module):
    """forward() -> the prefixes of every layer, flat: (n, L * 2 * d_kv), with d_kv = heads * head_dim."""

    def __init__(self, config: PrefixTuningConfig, d_kv: int, layers: int, like: torch.Tensor) -> None:
        super().__init__()
        n, h = config.num_virtual_tokens, config.encoder_hidden_size or d_kv
        kw = dict(device=like.device, dtype=like.dtype)
        self.embedding = nn.Parameter(torch.randn(n, d_kv, **kw))  # (n, d_kv): P'
        self.mlp = nn.Sequential(nn.Linear(d_kv, h, **kw), nn.Tanh(), nn.Linear(h, layers * 2 * d_kv, **kw))

    def forward(self) -> torch.Tensor:
        return self.mlp(self.embedding)  # (n, d_kv) -> (n, h) -> (n, L * 2 * d_kv)


class PrefixTuningMethod(PromptMethod):
    def resolve(self, model: nn.Module, config: PrefixTuningConfig) -> PrefixTuningConfig:
        """A virtual token here is one key (or value) per layer: its width is key/value heads x head dim."""
        layers, heads, head_dim = kv_shape(model)
        config = super().resolve(model, config)
        return dataclasses.replace(config, token_dim=heads * head_dim, num_layers=layers, num_attention_heads=heads)

    def build_encoder(self, config: PrefixTuningConfig, embedding: PromptLayer) -> nn.Module:
        like, d_kv, layers = embedding.weight, config.token_dim, config.num_layers
        if config.prefix_projection:
            return PrefixEncoder(config, d_kv, layers, like)
        table = 0.02 * torch.randn(config.num_virtual_tokens, layers * 2 * d_kv)  # GPT-2's init scale
        return PromptTable(table.to(like))

    def prepare_inputs(
        self, peft_model: nn.Module, kwargs: dict[str, Any], adapter_name: str, generating: bool = False
    ) -> dict:
        """Pass the prefix as a fresh key/value cache and let the mask cover its n positions."""
        embedding = peft_model.get_input_embeddings()
        name = embedding.active()
        if name is None:
            return kwargs
        if kwargs.get("past_key_values") is not None:
            raise ValueError("prefix tuning supplies past_key_values itself; use generate() for incremental decoding")
        ids = kwargs.get("input_ids")
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        if ref is None or (generating and ids is None):
            raise ValueError("prefix tuning needs input_ids=... (or inputs_embeds=... outside generate) by keyword")
        model = peft_model.base_model.model
        batch, length = ref.shape[:2]
        n = embedding.prompt_config[name].num_virtual_tokens
        check_length(model, n, length)
        layers, heads, head_dim = kv_shape(model)
        table = embedding.prompt_encoder[name]().to(embedding.weight.dtype)  # (n, L * 2 * d_kv)
        kv = table.view(n, layers, 2, heads, head_dim).permute(1, 2, 3, 0, 4)  # (L, 2, heads, n, head_dim)
        kv = kv[:, :, None].expand(-1, -1, batch, -1, -1, -1)  # (L, 2, B, heads, n, head_dim)
        kwargs["past_key_values"] = DynamicCache(ddp_cache_data=[(kv[i, 0], kv[i, 1]) for i in range(layers)])
        if generating:
            # generate() feeds only the ids not yet in the cache, counting the cache as leading ids:
            # n placeholder ids stand for the prefix and are never embedded (PeftModel.generate drops them).
            kwargs["input_ids"] = torch.cat([ids.new_zeros(batch, n), ids], dim=1)  # (B, n + T)
        return extend_for_prefix(kwargs, n, batch, length, ref.device, labels=False)


PREFIX_TUNING = register(PrefixTuningMethod(PrefixTuningConfig, PromptLayer))
