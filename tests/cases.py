"""One entry per registered method: how to configure it on each tiny model, and its
closed-form trainable-parameter count. The property suite (test_properties.py) runs
over every entry; a method that registers without an entry fails
test_every_method_has_a_case, so no method escapes the suite.

LoRA's entry is here; each family adds its own in tests/cases_<family>.py, a module
with a `CASES` dict that is merged in at the end of this file."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import minipeft as mp
from minipeft.core import linear_shape
from minipeft.models import tiny_bert, tiny_gpt2, tiny_llama

MODELS: dict[str, Callable[[], nn.Module]] = {"gpt2": tiny_gpt2, "llama": tiny_llama, "bert": tiny_bert}
# Targets that exercise each architecture: Conv1D (GPT-2), bias-free linears (LLaMA), BERT's encoder.
LINEAR_TARGETS = {"gpt2": ["c_attn", "c_proj"], "llama": "all-linear", "bert": ["query", "value", "dense"]}


def outputs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def lora_count(base: nn.Module, targets: list[str], r: int) -> int:
    """r * (d_in + d_out) per targeted linear."""
    return sum(r * sum(linear_shape(base.get_submodule(n))) for n in targets)


@dataclass
class Case:
    # config(model_kind, identity_init) -> a config of the method
    config: Callable[[str, bool], mp.PeftConfig]
    # closed_form(base, target_names, config) -> trainable parameter count
    closed_form: Callable[[nn.Module, list[str], mp.PeftConfig], int]
    mergeable: bool = True
    # False for methods that cannot start at the base model (prompt methods add tokens to the input).
    identity_at_init: bool = True
    # Architectures the method applies to; the others must refuse it clearly (BitFit: LLaMA has no biases).
    kinds: tuple[str, ...] = ("bert", "gpt2", "llama")
    # False for a method that rewrites the base weight at init (PiSSA keeps the residual there):
    # disable_adapter() then gives the residual model, which
    # test_reparam_methods.py::test_pissa_disable_gives_the_residual_model checks instead.
    keeps_base: bool = True


CASES: dict[str, Case] = {
    "LORA": Case(
        config=lambda kind, identity: mp.LoraConfig(
            r=4, lora_alpha=8, target_modules=LINEAR_TARGETS[kind], init_lora_weights=True if identity else False
        ),
        closed_form=lambda base, names, cfg: lora_count(base, names, cfg.r),
    ),
}

for _path in sorted(Path(__file__).parent.glob("cases_*.py")):
    CASES.update(importlib.import_module(f"tests.{_path.stem}").CASES)
