"""Where training memory goes: measured on real tensors, closed forms, and an estimator
that works from a transformers config alone. Taught in chapter 01 (measurement, closed
forms) and chapter 09 (the estimator).

Full fine-tuning with AdamW keeps, per parameter: the weight, its gradient, and two
optimizer moments. In fp32 that is 4 + 4 + 8 = 16 bytes; in mixed precision (fp16/bf16
weights and gradients, fp32 master copy and moments) 2 + 2 + 4 + 8 = 16 bytes as well
(Rajbhandari et al., 2020). Activations come on top and scale with batch x sequence.

`estimate_memory(config, peft_config, TrainingSetup(...))` builds the model on the meta
device (shapes, no storage), applies the PEFT method, and counts: parameters, gradients and
optimizer states exactly, activations from a per-architecture model of what autograd
saves (activation_memory.py), and the size of the adapter checkpoint. The last few built models
are kept: a sweep over batch size, sequence length, optimizer or checkpointing builds each once.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass
from typing import Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, PretrainedConfig
from transformers.initialization import no_init_weights

from .activation_memory import ARCHITECTURES, DTYPE_BYTES, activation_bytes
from .core.config import check_field_types
from .core.layers import innermost
from .core.model import PeftModel, get_peft_model
from .quant.nf4 import nf4_nbytes
from .quant.qlora import NF4Config


@dataclass
class MemoryReport:
    """Bytes of each kind of training state."""

    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def as_dict(self) -> dict[str, int]:
        return {
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "activations": self.activations,
        }


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# name -> (how to build it, state tensors it keeps per trainable weight)
OPTIMIZERS: dict[str, tuple[Callable, int]] = {
    "adamw": (lambda params, lr: torch.optim.AdamW(params, lr=lr), 2),
    "sgd": (lambda params, lr: torch.optim.SGD(params, lr=lr), 0),
    "sgd_momentum": (lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9), 1),
}


class _SavedTensors:
    """Bytes autograd holds for backward, live and at peak: each saved tensor is wrapped in a
    handle whose release (when its backward node has run) frees its storage's share."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude, self.refs, self.live, self.peak = exclude, {}, 0, 0

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.exclude:  # parameters and quantized weights are counted as weights
            return t
        if key not in self.refs:
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self.refs[key] = self.refs.get(key, 0) + 1
        return _Handle(t, key, storage.nbytes(), self)

    def release(self, key: int, nbytes: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.live -= nbytes


class _Handle:
    def __init__(self, t: torch.Tensor, key: int, nbytes: int, owner: _SavedTensors) -> None:
        self.t, self.key, self.nbytes, self.owner = t, key, nbytes, owner

    def __del__(self) -> None:
        self.owner.release(self.key, self.nbytes)


def _unpack(handle):
    return handle.t if isinstance(handle, _Handle) else handle


def measure_training_memory(
    model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], lr: float = 1e-4, optimizer: str = "adamw"
) -> MemoryReport:
    """Run one optimizer step on what requires grad and count the bytes actually held.

    Weights: every parameter, plus the buffers of linears stored in 4 bits (chapter 09).
    Activations: the peak of the tensors autograd holds for backward, over forward and backward
    (hooked as they are saved; parameters and several views of one storage are counted once).
    With gradient checkpointing, measure with `use_reentrant=True`: its recomputation passes
    through these hooks, PyTorch's non-reentrant mode hides it from them."""
    params = [p for p in model.parameters() if p.requires_grad]
    quantized = [b for m in model.modules() if getattr(m, "is_linear_layer", False) for b in m.buffers()]
    saved = _SavedTensors({t.untyped_storage().data_ptr() for t in [*model.parameters(), *quantized]})
    opt = OPTIMIZERS[optimizer][0](params, lr)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, _unpack):
        loss = loss_fn(model)
        loss.backward()
        del loss
    opt.step()
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    report = MemoryReport(
        weights=sum(_nbytes(t) for t in [*model.parameters(), *quantized]),
        gradients=sum(_nbytes(p.grad) for p in params if p.grad is not None),
        optimizer=sum(_nbytes(v) for v in state),
        activations=saved.peak,
    )
    opt.zero_grad(set_to_none=True)
    return report


def full_finetune_bytes(n_params: float, bytes_per_weight: int = 2, mixed_precision: bool = True) -> dict[str, float]:
    """Closed form for full fine-tuning with Adam, activations excluded.

    mixed_precision: weights and gradients in `bytes_per_weight`, plus an fp32 master copy
    (4 bytes) and two fp32 moments (8 bytes). Otherwise all fp32: 4 + 4 + 8."""
    if mixed_precision:
        return {
            "weights": n_params * (bytes_per_weight + 4),
            "gradients": n_params * bytes_per_weight,
            "optimizer": n_params * 8,
        }
    return {"weights": n_params * 4, "gradients": n_params * 4, "optimizer": n_params * 8}


def peft_bytes(n_params: float, n_trainable: float, bytes_per_weight: int = 2) -> dict[str, float]:
    """The same for a PEFT method: the frozen base is only stored; the trainable part
    gets gradients, an fp32 master copy and Adam moments as in full fine-tuning."""
    return {
        "weights": n_params * bytes_per_weight + n_trainable * 4,
        "gradients": n_trainable * bytes_per_weight,
        "optimizer": n_trainable * 8,
    }


@dataclass
class TrainingSetup:
    """How the model is trained: everything besides the model and the method that sets the bill."""

    batch_size: int  # sequences per optimizer step (no default: activations scale with it)
    seq_len: int  # tokens per sequence
    # Dtype of weights, gradients and activations (quantized weights dequantize to it).
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # State tensors kept per trainable weight: AdamW 2, SGD 0, SGD with momentum 1.
    optimizer: Literal["adamw", "sgd", "sgd_momentum"] = "adamw"
    # torch.optim keeps states in the weight's dtype; 32-bit optimizers (QLoRA's paged AdamW) in fp32.
    optimizer_dtype: Literal["param", "float32"] = "param"
    # Mixed precision: an fp32 master copy of every trainable weight (counted with the weights).
    master_weights: bool = False
    # Adapters on a 16-bit base: "float32", as get_peft_model makes them (peft's autocast_adapter_dtype), or
    # "base", in the base's dtype (autocast_adapter_dtype=False; the LoRA paper's fp16 checkpoints).
    adapter_dtype: Literal["float32", "base"] = "float32"
    # Keep only each block's input and recompute the block in the backward pass.
    gradient_checkpointing: bool = False
    # Dropout layers active (model.train() and p > 0 in the config): their masks are saved.
    dropout: bool = False
    # "fused": SDPA's flash kernel (no T x T matrix); "math": eager attention, or SDPA on CPU with dropout.
    attention: Literal["fused", "math"] = "fused"
    # "causal_lm": LM head and a loss over every token; "seq_cls": a classification head (config.num_labels).
    task: Literal["causal_lm", "seq_cls"] = "causal_lm"
    # Store base linears in NF4 (QLoRA); None keeps them in `dtype`.
    quantization: NF4Config | None = None

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.batch_size < 1 or self.seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {self.batch_size} and {self.seq_len}")


@dataclass
class MemoryEstimate(MemoryReport):
    """A MemoryReport predicted from shapes, with the counts and the adapter file size."""

    params: int  # as PeftModel counts them (a 4-bit weight counts as the weights it encodes)
    trainable: int
    checkpoint: int  # bytes of the saved tensors: the adapter file (full fine-tuning: the whole model)


# Fields an estimate needs, by model type, when the config comes as a dict.
REQUIRED_FIELDS = {
    "gpt2": ("n_layer", "n_embd", "n_head", "vocab_size"),
    "llama": ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"),
}


def _as_config(config: PretrainedConfig | dict) -> PretrainedConfig:
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"no activation recipe for model_type={model_type!r}; minipeft knows {sorted(ARCHITECTURES)}")
    if isinstance(config, dict):
        missing = [k for k in REQUIRED_FIELDS.get(model_type, REQUIRED_FIELDS["llama"]) if k not in config]
        if missing:
            raise ValueError(f"config for {model_type!r} is missing {missing}: the estimate needs the model's shape")
        config = AutoConfig.for_model(**config)
    return config


def build_meta_model(config: PretrainedConfig, setup: TrainingSetup) -> nn.Module:
    """The model on the meta device: every tensor has a shape and a dtype, none has storage."""
    auto = AutoModelForSequenceClassification if setup.task == "seq_cls" else AutoModelForCausalLM
    with torch.device("meta"), no_init_weights():
        model = auto.from_config(config).to(getattr(torch, setup.dtype))
    model.tie_weights()  # skipped with the initialisation; GPT-2's head shares the embedding
    return model


@dataclass
class _Counted:
    """What an estimate reads from the built model: it depends on the shapes, the method, the dtype,
    the head and the quantization, not on batch, sequence length, optimizer or checkpointing."""

    model: nn.Module  # on meta, with the PEFT method applied (the activation recipes read its layers)
    params: int
    trainable: int
    weights: int  # bytes, 4-bit linears at their NF4 size
    gradients: int  # bytes: one per trainable value, in its dtype (an adapter on a 16-bit base may be fp32)
    checkpoint: int  # bytes of the adapter file (full fine-tuning: every parameter)


# Recently counted models, by the JSON of what they were built from. A sweep over sequence lengths,
# batch sizes or optimizers (chapter 09's widget) builds each model once instead of at every point.
_COUNTED: OrderedDict[str, _Counted] = OrderedDict()
_COUNTED_SIZE = 4  # a sweep compares a few models; a 65B meta model with QLoRA adapters holds ~16 MB of modules


def _counted(config: PretrainedConfig, peft_config, setup: TrainingSetup) -> _Counted:
    parts = [config.to_dict(), type(peft_config).__name__, peft_config]
    parts += [setup.dtype, setup.adapter_dtype, setup.task, setup.quantization]
    key = json.dumps([asdict(p) if is_dataclass(p) else p for p in parts], sort_keys=True, default=repr)
    if key in _COUNTED:
        _COUNTED.move_to_end(key)
        return _COUNTED[key]
    inner = build_meta_model(config, setup)
    quantized = setup.quantization.targets(inner, peft_config) if setup.quantization and peft_config else []
    with torch.device("meta"), no_init_weights():  # adapters on meta too; no random initialisation
        autocast = setup.adapter_dtype == "float32"
        model = inner if peft_config is None else get_peft_model(inner, peft_config, autocast_adapter_dtype=autocast)
    e = DTYPE_BYTES[setup.dtype]
    params = list(model.parameters())
    weights = sum(_nbytes(p) for p in params)
    for name in quantized:  # stored in NF4 instead of `dtype`
        n = innermost(inner.get_submodule(name)).weight.numel()
        weights += nf4_nbytes(n, setup.quantization.blocksize, setup.quantization.double_quant) - n * e
    saved = model.adapter_state_dict() if isinstance(model, PeftModel) else dict(inner.named_parameters())
    _COUNTED[key] = counted = _Counted(
        model=inner,
        params=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in params if p.requires_grad),
        weights=weights,
        gradients=sum(_nbytes(p) for p in params if p.requires_grad),
        checkpoint=sum(_nbytes(t) for t in saved.values()),
    )
    if len(_COUNTED) > _COUNTED_SIZE:
        _COUNTED.popitem(last=False)
    return counted


def estimate_memory(config: PretrainedConfig | dict, peft_config=None, setup: TrainingSetup | None = None):
    """Bytes of one training step from a transformers config, a PEFT config (None: full
    fine-tuning) and a TrainingSetup. Exact for weights, gradients and optimizer states."""
    if setup is None:
        raise TypeError("estimate_memory needs a TrainingSetup(batch_size=..., seq_len=...)")
    if setup.quantization is not None and peft_config is None:
        raise ValueError("a 4-bit base cannot be fine-tuned in full: quantization needs a PEFT config (QLoRA)")
    config = _as_config(config)
    counted = _counted(config, peft_config, setup)
    trainable = counted.trainable
    # torch.optim keeps a state like its weight (the gradients' bytes); fp32 states (or a master copy) 4 bytes each
    state_bytes = 4 * trainable if setup.master_weights or setup.optimizer_dtype == "float32" else counted.gradients
    return MemoryEstimate(
        weights=counted.weights + (4 * trainable if setup.master_weights else 0),
        gradients=counted.gradients,
        optimizer=OPTIMIZERS[setup.optimizer][1] * state_bytes,
        activations=activation_bytes(counted.model, config, setup),
        params=counted.params,
        trainable=trainable,
        checkpoint=counted.checkpoint,
    )
