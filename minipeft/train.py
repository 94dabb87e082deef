"""A small, seeded training loop for sequence classification: AdamW on whatever
requires grad, a tqdm bar, periodic evaluation, and a history that chapters plot.
Used from chapter 01 on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.std import tqdm  # a text bar: a widget bar needs a kernel and would stay frozen on the static page

from .data import TextClassificationData, scale, tokenize


@dataclass
class TrainConfig:
    # Optimizer steps; about 5 s for a PEFT method on the tiny testbed (2 CPU cores).
    steps: int = 150
    # Examples per step.
    batch_size: int = 32
    # AdamW learning rate; PEFT methods like 1e-3 to 1e-2; full fine-tuning of the testbed 1e-3 (chapter 01),
    # of large pretrained models ~1e-5 to 1e-4.
    lr: float = 3e-3
    # AdamW weight decay; 0 keeps every method's update unshrunk, for a fair comparison.
    weight_decay: float = 0.0
    # Tokens per example. tiny: 32 (docstrings are ~16 tokens at median; their first 32 tokens hold the package
    # signal, and 64 costs 45% more time for no accuracy). full: 128 (SST-2 sentences, GPT-2's tokenizer).
    max_length: int = field(default_factory=lambda: 32 if scale() == "tiny" else 128)
    # Evaluate every this many steps (and at the end).
    eval_every: int = 50
    # Seeds the data order (and nothing else: the model is seeded where it is built).
    seed: int = 0
    # Show a progress bar.
    progress: bool = True
    # Where to train: a GPU when there is one (Colab, full scale), else the CPU.
    device: str = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class History:
    """What happened during training, for tables and plots."""

    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_accuracy: list[float] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)  # causal LMs: masked loss on the eval pairs
    seconds: float = 0.0  # wall time of the optimizer steps (evaluation excluded)
    trainable: int = 0  # parameters the optimizer updated

    @property
    def accuracy(self) -> float:
        return self.eval_accuracy[-1]

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(1, len(self.steps))


def trim(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the padding columns that no row of this batch uses (rows are right-padded)."""
    n = int(mask.sum(1).max())
    return ids[:, :n], mask[:, :n]  # (B, n), (B, n)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TensorDataset, batch_size: int = 256) -> float:
    """Accuracy of `model` on a tokenized dataset (input_ids, attention_mask, labels)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for batch in DataLoader(dataset, batch_size=batch_size):
        ids, mask, labels = (t.to(device) for t in batch)
        ids, mask = trim(ids, mask)
        logits = model(input_ids=ids, attention_mask=mask).logits  # (B, num_labels)
        correct += (logits.argmax(-1) == labels).sum().item()
    model.train(was_training)
    return correct / len(dataset)


def fit(
    model: nn.Module,
    train_set: TensorDataset,
    config: TrainConfig,
    backward: Callable[[list[tuple[torch.Tensor, ...]]], float],
    evaluate_now: Callable[[], float],
    metric: str,
    after_step: Callable[[int], object] | None = None,
) -> History:
    """The loop every trainer shares: AdamW on whatever requires grad, seeded batches, the bar, the history.
    Each optimizer step hands `grad_accumulation` batches (moved to the device) to `backward`, which computes
    the loss, calls backward and returns the loss; `evaluate_now()` is recorded in `history.<metric>`."""
    model.to(config.device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no parameter of the model requires grad: nothing to train")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    history = History(trainable=sum(p.numel() for p in params))
    accumulate = getattr(config, "grad_accumulation", 1)
    model.train()
    step = 0
    bar = tqdm(total=config.steps, disable=not config.progress, leave=False, desc="train")
    while step < config.steps:
        batches = iter(DataLoader(train_set, batch_size=config.batch_size, shuffle=True, generator=gen))
        for group in zip(*[batches] * accumulate, strict=False):  # a step's batches; a short tail waits
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = backward([tuple(t.to(config.device) for t in batch) for batch in group])
            optimizer.step()
            if after_step is not None:
                after_step(step + 1)
            history.seconds += time.perf_counter() - start
            step += 1
            history.steps.append(step)
            history.train_loss.append(loss)
            bar.update(1)
            if step % config.eval_every == 0 or step == config.steps:
                history.eval_steps.append(step)
                getattr(history, metric).append(evaluate_now())
            if step == config.steps:
                break
    bar.close()
    model.eval()
    return history


def train_classifier(
    model: nn.Module,
    data: TextClassificationData,
    tokenizer,
    config: TrainConfig | None = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    after_step: Callable[[int], object] | None = None,
) -> History:
    """Fine-tune whatever in `model` requires grad on `data`; return the history.

    Hooks for methods that steer their own training (AdaLoRA, chapter 07): `extra_loss()` is added
    to the loss (a regulariser), `after_step(step)` runs after each optimizer step, gradients intact."""
    config = config or TrainConfig()
    train_set = tokenize(data.train_texts, data.train_labels, tokenizer, config.max_length)
    eval_set = tokenize(data.eval_texts, data.eval_labels, tokenizer, config.max_length)

    def backward(group: list[tuple[torch.Tensor, ...]]) -> float:
        ((ids, mask, labels),) = group
        ids, mask = trim(ids, mask)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        (loss if extra_loss is None else loss + extra_loss()).backward()
        return loss.item()

    return fit(model, train_set, config, backward, lambda: evaluate(model, eval_set), "eval_accuracy", after_step)
