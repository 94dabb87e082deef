"""Virtual tokens: the machinery shared by prompt tuning, P-tuning and prefix tuning.
Taught in chapter 04 (the methods themselves: prompt_tuning.py, p_tuning.py, prefix_tuning.py).

These methods wrap no linear layer. Each adapter is a *prompt encoder*, a module whose
forward() returns a table of n learned vectors: n virtual token embeddings (n, d) for
prompt tuning and P-tuning, n key/value prefixes (n, L * 2 * d_kv) for prefix tuning.
The encoders live in a `PromptLayer` that wraps the model's input embedding, so naming,
training, saving, deleting and `disable_adapter()` are the shared code of every method.

How the virtual tokens reach the model, with no model-specific code:

- input-level prompts: `prepare_inputs` prepends n ids *past the end of the vocabulary*
  (V, V+1, ..., V+n-1) to `input_ids`; the `PromptLayer` embeds real ids as usual and
  replaces those n positions by the table's rows. Everything downstream (attention
  masks, classifier heads that find the last non-pad token, generate()) sees ordinary ids.
- prefix tuning passes the table as `past_key_values` instead (prefix_tuning.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.config import REGISTRY, Method, PeftConfig
from ..core.io import PREFIX
from ..core.layers import TunerLayer


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields every virtual-token method shares."""

    # n, the number of virtual tokens; Lester et al. find 20-100 enough at scale, 5-20 here.
    num_virtual_tokens: int = 20
    # Filled from the model when the adapter is added (peft's fields, so peft reads the file): the width
    # of one virtual token (prefix tuning: of one key or value), the number of layers and of (key/value) heads.
    token_dim: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_virtual_tokens < 1:
            raise ValueError(f"{type(self).__name__}.num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")

    def folded(self) -> PromptLearningConfig:
        """The config of this adapter once `fold_prompt_encoder` replaced its encoder by a plain table."""
        return self


class PromptTable(nn.Module):
    """The simplest prompt encoder: the table itself is the parameter."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(table)  # (n, width)

    def forward(self) -> torch.Tensor:
        return self.weight


class PromptLayer(TunerLayer):
    """The input embedding, plus one prompt encoder per adapter."""

    adapter_layer_names = ("prompt_encoder",)
    base_types = (nn.Embedding,)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.prompt_encoder = nn.ModuleDict()
        self.prompt_config: dict[str, PromptLearningConfig] = {}  # each adapter's resolved config (a hybrid's part)
        self.vocab_size = self.weight.shape[0]  # ids >= vocab_size are virtual tokens

    def add_adapter(self, name: str, config: PromptLearningConfig) -> None:
        self.prompt_encoder[name] = REGISTRY[config.peft_type].build_encoder(config, self)
        self.prompt_config[name] = config

    def active(self) -> str | None:
        """The adapter whose prompt runs now, or None (disabled, or no active adapter is a prompt)."""
        names = [n for n in self.active_adapters if n in self.prompt_encoder]
        if len(names) > 1:
            raise ValueError(
                f"adapters {names} are all prompt-style and active at once; their virtual tokens would compete "
                "for the same positions. Activate one of them together with any layer adapters"
            )
        return names[0] if names and not self.disabled else None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        virtual = input_ids >= self.vocab_size  # (B, T)
        if self.row_adapters is not None and (virtual.any() or set(self.row_adapters) & set(self.prompt_encoder)):
            raise ValueError(
                "prompt adapters change the input length, so one batch cannot mix them (adapter_names=...); "
                "run each prompt adapter on its own batch"
            )
        embeds = self.base_layer(input_ids.masked_fill(virtual, 0))  # (B, T, d)
        if not virtual.any():
            return embeds
        name = self.active()
        if name is None:
            raise ValueError(f"input_ids hold virtual-token ids (>= {self.vocab_size}) but no prompt adapter is active")
        table = self.prompt_encoder[name]().to(embeds.dtype)  # (n, d)
        rows = table[(input_ids - self.vocab_size).clamp(0, table.shape[0] - 1)]  # (B, T, d)
        return torch.where(virtual[..., None], rows, embeds)

    def delta_weight(self, name: str) -> torch.Tensor:
        raise ValueError(
            "virtual tokens are extra inputs, not a weight update: prompt methods cannot be merged; "
            "keep the PeftModel for inference (fold_prompt_encoder() drops a reparameterisation)"
        )


def context_size(model: nn.Module) -> int | None:
    """The model's number of positions (GPT-2 n_positions, max_position_embeddings elsewhere)."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def check_length(model: nn.Module, n_virtual: int, n_tokens: int) -> None:
    """n virtual + n real tokens must fit the model's positions."""
    limit = context_size(model)
    if limit is not None and n_virtual + n_tokens > limit:
        raise ValueError(
            f"{n_virtual} virtual tokens + {n_tokens} input tokens = {n_virtual + n_tokens} positions, but the "
            f"model has {limit}; use num_virtual_tokens <= {limit - n_tokens} or shorter inputs"
        )


# peft's task types by the end of a transformers class name: peft applies a prompt only in the PeftModel
# class of a task type, so a saved prompt adapter records the one its model has.
TASK_TYPES = {
    "ForCausalLM": "CAUSAL_LM",
    "LMHeadModel": "CAUSAL_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
    "Model": "FEATURE_EXTRACTION",  # a bare encoder or decoder (BertModel)
}


def task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    return next((task for end, task in TASK_TYPES.items() if name.endswith(end)), None)


class PromptMethod(Method):
    """Wraps the input embedding (its one target); `build_encoder` makes each method's prompt encoder."""

    def build_encoder(self, config: PromptLearningConfig, embedding: PromptLayer) -> nn.Module:
        raise NotImplementedError

    def targets(self, model: nn.Module, config: PromptLearningConfig) -> list[str]:
        embedding = model.get_input_embeddings()
        return [next(n for n, m in model.named_modules() if m is embedding)]

    def resolve(self, model: nn.Module, config: PromptLearningConfig) -> PromptLearningConfig:
        check_length(model, config.num_virtual_tokens, 1)
        c = model.config
        width = model.get_input_embeddings().weight.shape[1]
        return dataclasses.replace(
            config,
            token_dim=width,
            num_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            task_type=config.task_type or task_type(model),
        )

    def to_file(self, model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """peft's layout: the prompt as the one table its encoder computes, `prompt_embeddings` (n, width).
        A reparameterisation (P-tuning's MLP/LSTM, prefix tuning's MLP) is not saved, as in peft: what the
        file keeps is what inference needs, and it loads folded (`fold_prompt_encoder`)."""
        encoder = model.get_input_embeddings().prompt_encoder[adapter_name]
        own = {id(p) for p in encoder.parameters()}
        with torch.no_grad():
            table = encoder()  # (n, width)
        return {"prompt_embeddings": table, **{k: v for k, v in tensors.items() if id(v) not in own}}

    def from_file(
        self, model: nn.Module, config: PromptLearningConfig, tensors: dict[str, torch.Tensor]
    ) -> tuple[PromptLearningConfig, dict[str, torch.Tensor]]:
        """A `prompt_embeddings` table (peft's files and ours) loads as a folded adapter; a file that holds an
        encoder's own tensors (written by minipeft before it followed peft's layout) loads as it is."""
        if "prompt_embeddings" not in tensors:
            return config, tensors
        site = self.targets(model, config)[0]
        rest = {k: v for k, v in tensors.items() if k != "prompt_embeddings"}
        return config.folded(), {**rest, f"{PREFIX}{site}.prompt_encoder.weight": tensors["prompt_embeddings"]}

    def prepare_inputs(
        self, peft_model: nn.Module, kwargs: dict[str, Any], adapter_name: str, generating: bool = False
    ) -> dict:
        """Prepend n virtual-token ids (or embeddings) and extend the mask, token types and labels."""
        embedding = peft_model.get_input_embeddings()
        name = embedding.active()
        if name is None:
            return kwargs
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        if ids is None and embeds is None:
            raise ValueError("prompt methods need input_ids=... (or inputs_embeds=...) passed by keyword")
        if kwargs.get("position_ids") is not None:
            raise ValueError("prompt methods choose the positions themselves; do not pass position_ids")
        batch, length = (ids if ids is not None else embeds).shape[:2]
        n = embedding.prompt_config[name].num_virtual_tokens
        check_length(peft_model.base_model.model, n, length)
        device = (ids if ids is not None else embeds).device
        if ids is not None:
            virtual = torch.arange(n, device=device) + embedding.vocab_size  # (n,)
            kwargs["input_ids"] = torch.cat([virtual.expand(batch, n), ids], dim=1)  # (B, n + T)
        else:
            table = embedding.prompt_encoder[name]().to(embeds.dtype)  # (n, d)
            kwargs["inputs_embeds"] = torch.cat([table.expand(batch, -1, -1), embeds], dim=1)  # (B, n + T, d)
        return extend_for_prefix(kwargs, n, batch, length, device, labels=True)


def extend_for_prefix(
    kwargs: dict[str, Any], n: int, batch: int, length: int, device: torch.device, labels: bool
) -> dict[str, Any]:
    """Attend to n extra leading positions: mask ones (made if missing), token type 0, label -100."""
    mask = kwargs.get("attention_mask")
    mask = torch.ones(batch, length, dtype=torch.long, device=device) if mask is None else mask
    kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)  # (B, n + T)
    if kwargs.get("token_type_ids") is not None:
        types = kwargs["token_type_ids"]
        kwargs["token_type_ids"] = torch.cat([types.new_zeros(batch, n), types], dim=1)
    target = kwargs.get("labels")
    if labels and target is not None and target.shape[:2] == (batch, length):  # per-token labels (LM, tagging)
        kwargs["labels"] = torch.cat([target.new_full((batch, n), -100), target], dim=1)
    return kwargs


def fold_prompt_encoder(peft_model: nn.Module, adapter_name: str | None = None) -> None:
    """Replace a reparameterised prompt (P-tuning's LSTM/MLP, prefix tuning's MLP) by the table it
    computes, once training is over: same outputs, fewer parameters. (A saved prompt is that table already:
    `PromptMethod.to_file`.)"""
    name = adapter_name or peft_model.active_adapter
    embedding = peft_model.get_input_embeddings()
    encoder = embedding.prompt_encoder[name]
    if isinstance(encoder, PromptTable):
        return
    trainable = any(p.requires_grad for p in encoder.parameters())
    with torch.no_grad():
        table = encoder().detach().clone()  # (n, width)
    embedding.prompt_encoder[name] = PromptTable(table).requires_grad_(trainable)
    embedding.prompt_config[name] = embedding.prompt_config[name].folded()
    peft_model.peft_config[name] = peft_model.peft_config[name].folded()
